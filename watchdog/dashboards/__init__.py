"""Grafana dashboards for gradwatch, generated from code and pushed through Grafana's HTTP API.

    gradwatch dashboards generate [--out DIR]      # rewrite the committed JSON in dashboards/
    gradwatch dashboards push --url URL --token T  # create the folder, upload with overwrite

The dashboards are built with grafana-foundation-sdk (the ``dashboards`` extra) in
:mod:`.overview` and :mod:`.layers`; :mod:`.render` turns them into the JSON committed
in ``dashboards/``, which Grafana's file provisioning, its Kubernetes sidecar and
:mod:`.push` all read. Nothing here imports torch or the watchdog service.
"""
