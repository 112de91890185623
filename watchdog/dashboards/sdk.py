"""The grafana-foundation-sdk modules the dashboards use, imported in one place.

The SDK marks its classic dashboard schema deprecated (at import time) in favour of
the v2 schema, which only Grafana 12+ reads, behind a feature flag. Grafana's file
provisioning, its Kubernetes sidecar and ``POST /api/dashboards/db`` all take the
classic JSON model, so that is what gradwatch generates; the warning is silenced here.
"""

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as common_builders
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models import heatmap as heatmap_model

__all__ = [
    "JSONEncoder", "common", "common_builders", "dash", "heatmap", "heatmap_model", "model", "prometheus", "stat",
    "statetimeline", "timeseries",
]
