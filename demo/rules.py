"""The watchdog config the demo runs: the built-in default rule pack, a webhook notifier,
and — for scenarios whose story needs minutes of a real run — the pack's clock sped up.

A demo step takes milliseconds where a real one takes about a second, so a rule that waits
5 minutes (VanishingGradients' ``for``) would never fire within a one-minute demo.
``time_scale`` divides every duration of the pack (``for``, ``keep_firing_for``, windows,
policy ``after``/``repeat``) by the same factor; thresholds and everything else stay as
deployed. The demo prints the factor whenever it is not 1.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gradwatch.watchdog.rules.loader import load_rules

_RULE_DURATIONS = ("for_", "keep_firing_for", "window", "forget_after")
_STEP_DURATIONS = ("after", "repeat")


def _scaled(model, names: tuple[str, ...], time_scale: float):
    return model.model_copy(
        update={n: getattr(model, n) / time_scale for n in names if n in type(model).model_fields}
    )


def default_rules(time_scale: float = 1.0) -> list:
    """The built-in pack with every duration divided by ``time_scale``."""
    rules = []
    for rule in load_rules(None).rules:
        steps = [_scaled(step, _STEP_DURATIONS, time_scale) for step in rule.on_fire]
        rules.append(_scaled(rule, _RULE_DURATIONS, time_scale).model_copy(update={"on_fire": steps}))
    return rules


def write_config(path: Path, webhook_url: str, time_scale: float = 1.0) -> Path:
    """A ``gradwatch serve --config`` file: the (scaled) default pack, notifying ``webhook_url``."""
    rules = [rule.model_dump(mode="json", by_alias=True) for rule in default_rules(time_scale)]
    config = {"rules": rules, "notifiers": [{"type": "webhook", "name": "demo-webhook", "url": webhook_url}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
