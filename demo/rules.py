"""The watchdog config the demo runs: the built-in default rule pack, a webhook notifier,
and — for scenarios whose story needs minutes of a real run — the pack's clock sped up.

A demo step takes milliseconds where a real one takes about a second, so a rule that waits
5 minutes (VanishingGradients' ``for``) would never fire within a one-minute demo.
``time_scale`` divides every duration of the pack (``for``, ``keep_firing_for``, windows,
policy ``after``/``repeat``) by the same factor, and so do the service's and the agent's own time
bounds (cooldowns, the command window and TTL, the undo's wait: :func:`scaled_settings`,
:func:`scaled_agent_bounds`); thresholds and counts stay as deployed. The demo prints the factor
whenever it is not 1.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from gradwatch.agent.config import AgentConfig
from gradwatch.watchdog.durations import Span
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.settings import Settings

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


SERVICE_DURATIONS = ("restore_after", "command_cooldown", "command_window", "command_ttl")
"""The service's own time bounds: on the same fast clock as the rules (the cap's count stays)."""
AGENT_DURATIONS = ("lr_cut_cooldown_s", "lr_cut_window_s")


def scaled_settings(time_scale: float) -> dict[str, str]:
    """``gradwatch serve`` settings (for :class:`~gradwatch.demo.services.WatchdogProcess`) with the
    service's time bounds divided by ``time_scale``, so the cooldowns, the command window and TTL and the
    undo's wait keep their proportion to the rules' durations."""
    out = {}
    for name in SERVICE_DURATIONS:
        default = Settings.model_fields[name].default
        seconds = default.seconds if isinstance(default, Span) else float(default)
        out[name] = f"{seconds / time_scale * 1000:.0f}ms"
    return out


def scaled_agent_bounds(time_scale: float) -> dict[str, float]:
    """``watch()`` settings: the agent's own LR-cut cooldown and window on the same fast clock."""
    return {name: AgentConfig.model_fields[name].default / time_scale for name in AGENT_DURATIONS}


def write_config(path: Path, webhook_url: str, time_scale: float = 1.0) -> Path:
    """A ``gradwatch serve --config`` file: the (scaled) default pack, notifying ``webhook_url``."""
    rules = [rule.model_dump(mode="json", by_alias=True) for rule in default_rules(time_scale)]
    config = {"rules": rules, "notifiers": [{"type": "webhook", "name": "demo-webhook", "url": webhook_url}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
