"""Turn firing alerts into commands: each rule's ``on_fire`` steps, escalating while its condition holds.

Judgement before lasting action: a step that would change the rest of the run
(:data:`~gradwatch.watchdog.judgement.LASTING_ACTIONS`) is taken only when
:func:`~gradwatch.watchdog.judgement.judge` finds evidence that the run is being harmed
(a non-finite step, a rising or spiking loss, a norm that keeps growing while the loss
does not improve). Without it the step is held back, audited once with the evidence
for and against, and looked at again every round while the alert fires: a gradient
jump on an improving loss (a network that has started to learn) is notified, never
remediated.

A step the agent refuses (or that expires unread) does not use up the policy: the
next step is due at once, and the refused command counts towards neither the
watchdog's cooldown nor its cap (:meth:`CommandService.issue`).

In ``observe`` mode (the service's ``--remediation observe``, or a rule's
``remediation: observe``) every decision is made and audited as ``command.observed``
("would apply X at step N") and shown on the alert's notification, and nothing is sent.

State is derived, not kept: the commands already issued for the run under this
rule since the alert fired say which step is next, so a restarted watchdog
continues where it stopped (observed decisions are held in memory). Alerts fired
by Prometheus reach the same place through Alertmanager's webhook (:func:`from_alertmanager`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandRefused, CommandService, failed
from gradwatch.watchdog.judgement import ALWAYS, Evidence
from gradwatch.watchdog.rules.policy import Policy, PolicyStep, RemediationMode
from gradwatch.watchdog.samples import build_labels
from gradwatch.watchdog.schema import Action
from gradwatch.watchdog.store import CommandRecord

log = logging.getLogger("gradwatch.watchdog")

ACTION_LABEL = "gradwatch_action"
"""Alert label naming the remediation for Prometheus-fired alerts; `gradwatch_<param>` labels give its parameters."""

_ACTION = TypeAdapter(Action)

Judge = Callable[[Alert, float], Evidence]
"""The evidence of harm for an alert's run at ``now`` (see :mod:`gradwatch.watchdog.judgement`)."""


@dataclass(frozen=True)
class Taken:
    """One step already taken in an alert's episode: when, at which step of the run, and whether it failed."""

    at: float
    step: int | None
    failed: bool = False


def next_step(steps: list[PolicyStep], taken: list[Taken], fired: Taken, now: float, step: int | None) -> PolicyStep | None:
    """The step due now, given the steps already taken in this firing episode (newest first).

    Waits count from the newest step that took effect (or the firing); a step right
    after a failed one is due at once: the policy falls through its refused rungs.
    """
    k = len(taken)
    anchor = next((t for t in taken if not t.failed), fired)
    if k < len(steps):
        due = steps[k]
        if taken and taken[0].failed:
            return due
        return due if due.after.elapsed(anchor.at, now, anchor.step, step) else None
    last = steps[-1]
    newest = taken[0] if taken else fired  # a refused repeat waits its interval too: no retry every round
    return last if last.repeat and last.repeat.elapsed(newest.at, now, newest.step, step) else None


def describe(spec: Action) -> str:
    params = ", ".join(f"{k} {v}" for k, v in spec.model_dump(mode="json", exclude={"action"}).items() if v is not None)
    return f"{spec.action} ({params})" if params else spec.action


class Remediator:
    """Decides, each round, which policy step is due for each firing alert, and takes it or holds it back.

    ``judge`` gives the evidence of harm for an alert (None: every alert counts as harm,
    for callers that judged already); ``progress`` the run's current optimizer step
    (for waits in steps, and the audit); ``mode`` the service's remediation mode.
    """

    def __init__(
        self,
        commands: CommandService,
        policies: Callable[[], dict[str, Policy]],
        *,
        judge: Judge | None = None,
        progress: Callable[[str], int | None] = lambda run: None,
        mode: RemediationMode = "enforce",
    ) -> None:
        self.commands = commands
        self.policies = policies
        self.judge = judge
        self.progress = progress
        self.mode = mode
        self.notes: dict[tuple[str, str], str] = {}
        """(rule, fingerprint) → the latest decision about that alert, shown on its notifications."""
        self._audited: set[tuple] = set()  # (kind, rule, fingerprint, fired_at, step index) audited once
        self._observed: dict[tuple[str, str, float], list[Taken]] = {}  # observe mode's would-be steps, newest first
        self._fired_step: dict[tuple[str, str, float], int | None] = {}
        self._issued_step: dict[str, int | None] = {}  # command id → the run's step when it was issued

    def decide(self, alerts: Iterable[Alert], now: float) -> list[CommandRecord]:
        """Issue (or, in observe mode, record) the commands due for firing alerts whose condition still holds."""
        policies = self.policies()
        issued_now = []
        live = set()
        for alert in alerts:
            policy = policies.get(alert.rule)
            run = alert.label("run")
            if not policy or not policy.steps or not run or alert.state is not AlertState.FIRING:
                continue
            if alert.keep_firing_since is not None:  # kept firing, condition gone: no escalation
                continue
            mode = policy.mode or self.mode
            if mode == "enforce" and not self.commands.enabled:
                continue  # no secret: the watchdog notifies only
            fired_at = alert.fired_at or now
            key = (alert.rule, alert.fingerprint, fired_at)
            live.add(key)
            step = self.progress(run)
            fired = Taken(fired_at, self._fired_step.setdefault(key, step))
            taken = self._taken(key, run, alert.rule, mode, now)
            due = next_step(policy.steps, taken, fired, now, step)
            if due is None:
                continue
            record = self._take(alert, due, len(taken), mode, run, step, now, after_failed=bool(taken) and taken[0].failed)
            if record is not None:
                issued_now.append(record)
        for key in [k for k in self._fired_step if k not in live]:
            self._fired_step.pop(key)
            self._observed.pop(key, None)
        return issued_now

    def _take(
        self, alert: Alert, due: PolicyStep, index: int, mode: str, run: str, step: int | None, now: float,
        after_failed: bool = False,
    ) -> CommandRecord | None:
        evidence = self.judge(alert, now) if due.needs_evidence and self.judge is not None else ALWAYS
        at_step = f" at step {step}" if step is not None else ""
        what = describe(due.spec)
        details: dict[str, Any] = {"spec": due.spec.model_dump(mode="json"), "step": step, "evidence": evidence.summary()}
        reason = f"{alert.rule} firing for {dict(alert.labels)}"
        if after_failed:  # the audit says why this step came early
            reason += "; the previous step did not take effect (refused or expired): falling through"
        once = (alert.rule, alert.fingerprint, alert.fired_at, index)
        if evidence.known and not evidence.harmful:
            self.notes[(alert.rule, alert.fingerprint)] = f"held back {what}{at_step}: {evidence.summary()}"
            self._audit_once("command.held_back", once, alert, run, now, details)
            return None
        if mode == "observe":
            self._observed.setdefault((alert.rule, alert.fingerprint, alert.fired_at or now), []).insert(0, Taken(now, step))
            self.notes[(alert.rule, alert.fingerprint)] = f"would apply {what}{at_step} (observe mode; {evidence.summary()})"
            self.commands.store.append_audit(
                "command.observed", time=now, run=run, rule=alert.rule, fingerprint=alert.fingerprint,
                details={**details, "reason": reason},
            )
            log.warning("gradwatch: observe mode: would apply %s to run %s%s (%s)", what, run, at_step, reason)
            return None
        try:
            record = self.commands.issue(
                run, due.spec, reason=reason, rule=alert.rule, fingerprint=alert.fingerprint, now=now,
                evidence=evidence.summary(), step=step,
            )
        except CommandRefused as exc:
            self._audit_once("command.suppressed", once, alert, run, now, {**details, "reason": str(exc)})
            return None
        self._issued_step[record.id] = step
        self.notes[(alert.rule, alert.fingerprint)] = f"issued {what}{at_step} ({evidence.summary()})"
        return record

    def _taken(self, key: tuple[str, str, float], run: str, rule: str, mode: str, now: float) -> list[Taken]:
        if mode == "observe":
            return self._observed.get(key, [])
        # Every command for this run and rule since the alert fired counts, whatever asked for it
        # (this alert, a sibling alert of the same rule, or Prometheus through Alertmanager):
        # remediation is per run, and the same alert can arrive by both paths.
        records = self.commands.table.list(run=run, rule=rule, since=key[2], limit=1000)
        return [Taken(r.issued_at, self._step_of(r), failed(r, now)) for r in records]

    def _step_of(self, record: CommandRecord) -> int | None:
        if record.id in self._issued_step:
            return self._issued_step[record.id]
        return record.ack.get("step") if record.ack else None  # after a restart: where it took effect

    def _audit_once(self, kind: str, once: tuple, alert: Alert, run: str, now: float, details: dict[str, Any]) -> None:
        if (kind, *once) in self._audited:
            return
        self._audited.add((kind, *once))
        self.commands.store.append_audit(
            kind, time=now, run=run, rule=alert.rule, fingerprint=alert.fingerprint, details=details
        )
        log.warning("gradwatch: %s for run %s %s: %s", details["spec"]["action"], run,
                    "held back" if kind == "command.held_back" else "not issued", details.get("reason", details["evidence"]))

    def from_alertmanager(self, payload: dict, now: float) -> list[dict]:
        """:func:`from_alertmanager` with this remediator's judgement and mode."""
        return from_alertmanager(payload, self.commands, now, judge=self.judge, mode=self.mode)


def spec_from_labels(labels: dict[str, str]) -> Action:
    """The action an Alertmanager alert asks for: `gradwatch_action` plus `gradwatch_<param>` labels."""
    fields: dict[str, Any] = {"action": labels[ACTION_LABEL]}
    for key, value in labels.items():
        if key.startswith("gradwatch_") and key != ACTION_LABEL:
            fields[key.removeprefix("gradwatch_")] = value
    return _ACTION.validate_python(fields)


def _epoch(rfc3339: str | None, default: float) -> float:
    """Alertmanager's startsAt (RFC 3339, up to nanoseconds) in seconds since the epoch."""
    if not rfc3339:
        return default
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339.strip()).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return default


def from_alertmanager(
    payload: dict, commands: CommandService, now: float, *, judge: Judge | None = None, mode: RemediationMode = "enforce"
) -> list[dict]:
    """Handle an Alertmanager webhook (v4): one command per firing alert that names an action and a run.

    Deduplicated on the alert's fingerprint and firing episode (its startsAt): Alertmanager
    re-sends a group at every group_interval, the command goes out once. A lasting action
    is judged like a rule's policy step (onset: the alert's startsAt): held back without
    evidence of harm — the next re-send is judged again. In observe mode nothing is issued.
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
        except ValidationError as exc:
            outcomes.append({**outcome, "result": "refused", "reason": str(exc)})
            continue
        evidence = ALWAYS
        if judge is not None and PolicyStep(spec=spec).needs_evidence:
            onset = _epoch(alert.get("startsAt"), now)
            as_alert = Alert(rule=labels.get("alertname", ""), labels=build_labels(labels), active_at=onset, fired_at=onset)
            evidence = judge(as_alert, now)
        if evidence.known and not evidence.harmful:
            outcomes.append({**outcome, "result": "held_back", "reason": evidence.summary()})
            continue
        if mode == "observe":
            outcomes.append({**outcome, "result": "observed", "would_issue": spec.model_dump(mode="json")})
            continue
        try:
            record = commands.issue(
                labels["run"], spec, reason=f"Alertmanager: {labels.get('alertname')}",
                rule=labels.get("alertname"), fingerprint=episode, now=now, evidence=evidence.summary(),
            )
            outcomes.append({**outcome, "result": "issued", "command_id": record.id})
        except CommandRefused as exc:
            outcomes.append({**outcome, "result": "refused", "reason": str(exc)})
    return outcomes
