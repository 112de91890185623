"""Turn firing alerts into commands: each rule's ``on_fire`` steps, escalating while its condition holds.

State is derived, not kept: the commands already issued for the run under this
rule since the alert fired say which step is next,
so a restarted watchdog continues where it stopped. Alerts fired by Prometheus reach
the same place through Alertmanager's webhook (:func:`from_alertmanager`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandRefused, CommandService
from gradwatch.watchdog.rules.policy import PolicyStep
from gradwatch.watchdog.schema import Action
from gradwatch.watchdog.store import CommandRecord

log = logging.getLogger("gradwatch.watchdog")

ACTION_LABEL = "gradwatch_action"
"""Alert label naming the remediation for Prometheus-fired alerts; `gradwatch_<param>` labels give its parameters."""

_ACTION = TypeAdapter(Action)


def next_step(steps: list[PolicyStep], issued: list[CommandRecord], fired_at: float, now: float) -> PolicyStep | None:
    """The step due now, given the commands already issued in this firing episode (newest first)."""
    k = len(issued)
    last = issued[0].issued_at if issued else fired_at
    if k < len(steps):
        step = steps[k]
        return step if now >= last + step.after else None
    step = steps[-1]
    return step if step.repeat and now >= last + step.repeat else None


class Remediator:
    def __init__(self, commands: CommandService, policies: Callable[[], dict[str, list[PolicyStep]]]) -> None:
        self.commands = commands
        self.policies = policies
        self._suppressed: set[tuple[str, str, int]] = set()  # (rule, fingerprint, step) already audited

    def decide(self, alerts: Iterable[Alert], now: float) -> list[CommandRecord]:
        """Issue the commands due for firing alerts whose condition still holds."""
        if not self.commands.enabled:
            return []
        policies = self.policies()
        issued_now = []
        for alert in alerts:
            steps = policies.get(alert.rule)
            run = alert.label("run")
            if not steps or not run or alert.state is not AlertState.FIRING or alert.keep_firing_since is not None:
                continue
            # Every command for this run and rule since the alert fired counts, whatever asked for it
            # (this alert, a sibling alert of the same rule, or Prometheus through Alertmanager):
            # remediation is per run, and the same alert can arrive by both paths.
            issued = self.commands.table.list(run=run, rule=alert.rule, since=alert.fired_at, limit=1000)
            step = next_step(steps, issued, alert.fired_at or now, now)
            if step is None:
                continue
            reason = f"{alert.rule} firing for {dict(alert.labels)}"
            try:
                issued_now.append(
                    self.commands.issue(run, step.spec, reason=reason, rule=alert.rule, fingerprint=alert.fingerprint, now=now)
                )
            except CommandRefused as exc:
                key = (alert.rule, alert.fingerprint, len(issued))
                if key not in self._suppressed:
                    self._suppressed.add(key)
                    self.commands.store.append_audit(
                        "command.suppressed", time=now, run=run, rule=alert.rule, fingerprint=alert.fingerprint,
                        details={"spec": step.spec.model_dump(mode="json"), "reason": str(exc)},
                    )
                    log.warning("gradwatch: %s for run %s not issued: %s", step.spec.action, run, exc)
        return issued_now


def spec_from_labels(labels: dict[str, str]) -> Action:
    """The action an Alertmanager alert asks for: `gradwatch_action` plus `gradwatch_<param>` labels."""
    fields: dict[str, Any] = {"action": labels[ACTION_LABEL]}
    for key, value in labels.items():
        if key.startswith("gradwatch_") and key != ACTION_LABEL:
            fields[key.removeprefix("gradwatch_")] = value
    return _ACTION.validate_python(fields)


def from_alertmanager(payload: dict, commands: CommandService, now: float) -> list[dict]:
    """Handle an Alertmanager webhook (v4): one command per firing alert that names an action and a run.

    Deduplicated on the alert's fingerprint and firing episode (its startsAt): Alertmanager
    re-sends a group at every group_interval, the command goes out once.
    Returns one outcome per alert, for the response and the audit log.
    """
    outcomes = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        fingerprint = alert.get("fingerprint") or ""
        outcome = {"fingerprint": fingerprint, "alertname": labels.get("alertname")}
        if alert.get("status") != "firing" or ACTION_LABEL not in labels or "run" not in labels:
            outcomes.append({**outcome, "result": "ignored"})
            continue
        episode = f"am:{fingerprint}:{alert.get('startsAt', '')}"
        if any(r.fingerprint == episode for r in commands.table.list(run=labels["run"], rule=labels.get("alertname"), limit=1000)):
            outcomes.append({**outcome, "result": "duplicate"})
            continue
        try:
            spec = spec_from_labels(labels)
            record = commands.issue(
                labels["run"], spec, reason=f"Alertmanager: {labels.get('alertname')}",
                rule=labels.get("alertname"), fingerprint=episode, now=now,
            )
            outcomes.append({**outcome, "result": "issued", "command_id": record.id})
        except (ValidationError, CommandRefused) as exc:
            outcomes.append({**outcome, "result": "refused", "reason": str(exc)})
    return outcomes
