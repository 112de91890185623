"""Undo: every automatic remediation is taken back once it is no longer needed.

An LR cut or clipping that stays on after the incident is over slows the run for the
rest of its life. For each registered run, once every alert of a rule with a policy
has resolved and the run has been healthy for ``restore_after`` (seconds or optimizer
steps; no evidence of harm in that window, :func:`~gradwatch.watchdog.judgement.judge`),
the watchdog takes one restoring step, then waits ``restore_after`` again before the next:

1. the LR scale back up x2 per step (``restore_lr`` with ``factor: 2``; at 1 the scale's floor is cleared too),
2. then the clipping a policy enabled is disabled.

Stepwise, because the learning rate that exploded is the one being restored: a run
that cannot take it shows it at half the step. If a remediating alert fires again
after restoration began, the policies re-apply what is needed (on evidence, as always)
and restoration stops for that incident (``remediation.restore_abandoned``): no
oscillation. The incident ends when the agent reports its baseline again (LR scale 1,
no clipping). What an operator commanded is the operator's: a run whose newest state
change came from a manual command, or that an operator pinned
(``gradwatch pin RUN``), is never restored. Restore commands are bounded (the
watchdog's cap and cooldown) and audited like every command; in observe mode they are
only audited.

State is derived from the command table (the agent's acknowledgements carry its LR scale
and clipping after each command) and the audit log (pins, abandoned restorations), so a
restarted watchdog continues; only the start of the healthy window is in memory (a
restart starts it again: the conservative side).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandRefused, CommandService
from gradwatch.watchdog.durations import Span
from gradwatch.watchdog.judgement import Evidence
from gradwatch.watchdog.rules.policy import Policy, RemediationMode
from gradwatch.watchdog.schema import DisableClipping, RestoreLR
from gradwatch.watchdog.store import CommandRecord

log = logging.getLogger("gradwatch.watchdog")

RESTORE_RULE = "gradwatch:restore"
"""The `rule` of restoring commands (no rule name can contain a colon)."""
RESTORE_FACTOR = 2.0
PIN_KINDS = ("remediation.pinned", "remediation.unpinned")


@dataclass(frozen=True)
class InForce:
    """What automatic remediation a run carries now, read from its acknowledged commands."""

    lr_scale: float
    auto_clipping: bool
    since: float
    """When the incident began: the first applied command after the run's last baseline state."""
    restores: list[CommandRecord]
    """Restoring commands issued since then, newest first."""

    @property
    def baseline(self) -> bool:
        return self.lr_scale >= 1.0 and not self.auto_clipping


def in_force(records: list[CommandRecord]) -> InForce | None:
    """The automatic remediation in force, from the run's commands (newest first); None when there is
    none or when an operator's command made the newest change (the operator owns the run's state)."""
    applied = [r for r in records if r.ack is not None and r.ack.get("status") == "applied"]
    changes = [r for r in applied if r.action not in ("checkpoint", "stop")]
    if not changes or changes[0].rule is None:
        return None
    newest = changes[0].ack
    lr_scale = float(newest.get("lr_scale", 1.0))
    clipping = newest.get("clipping") is not None
    enables = [r for r in changes if r.action == "enable_clipping"]
    auto_clipping = clipping and bool(enables) and enables[0].rule is not None
    since = changes[0].issued_at
    for r in changes:  # back to the newest state that was the baseline
        if float(r.ack.get("lr_scale", 1.0)) >= 1.0 and r.ack.get("clipping") is None:
            break
        since = r.issued_at
    restores = [r for r in records if r.rule == RESTORE_RULE and r.issued_at >= since]
    state = InForce(lr_scale, auto_clipping, since, restores)
    return None if state.baseline else state


class Restorer:
    """Each round, one restoring step per run that is due one (see the module docstring).

    ``runs`` lists the registered runs; ``healthy`` judges a run between two times (no
    onset: the window itself is the reference); ``progress`` gives its current step.
    """

    def __init__(
        self,
        commands: CommandService,
        policies: Callable[[], dict[str, Policy]],
        *,
        runs: Callable[[], Iterable[str]],
        healthy: Callable[[str, float, float], Evidence],
        progress: Callable[[str], int | None],
        restore_after: Span,
        mode: RemediationMode = "enforce",
    ) -> None:
        self.commands = commands
        self.policies = policies
        self.runs = runs
        self.healthy = healthy
        self.progress = progress
        self.restore_after = restore_after
        self.mode = mode
        self._quiet: dict[str, tuple[float, int | None]] = {}  # run → (time, step) its healthy window began

    def decide(self, alerts: Iterable[Alert], now: float) -> list[CommandRecord]:
        policies = self.policies()
        busy: dict[str, list[Alert]] = {}
        for alert in alerts:
            run = alert.label("run")
            if run and alert.rule in policies and alert.state is not AlertState.INACTIVE:
                busy.setdefault(run, []).append(alert)
        issued = []
        for run in set(self.runs()):
            record = self._decide_run(run, busy.get(run, []), now)
            if record is not None:
                issued.append(record)
        return issued

    def _decide_run(self, run: str, alerts: list[Alert], now: float) -> CommandRecord | None:
        if not self.commands.enabled:
            return None
        step = self.progress(run)
        records = self.commands.table.list(run=run, limit=1000)
        state = in_force(records)
        if state is None:
            self._quiet.pop(run, None)
            return None
        if alerts:
            self._quiet[run] = (now, step)
            if state.restores and any(a.state is AlertState.FIRING and (a.fired_at or 0) > state.restores[-1].issued_at for a in alerts):
                self._abandon(run, state, alerts, now)
            return None
        if self._pinned(run) or self._abandoned(run, state):
            return None
        # The healthy window starts at the run's newest command or the last round it was busy, whichever is later.
        newest = records[0].issued_at
        since_t, since_step = self._quiet.setdefault(run, (newest, step))
        if newest > since_t:  # a command arrived after the window began (e.g. an operator's): start again
            since_t, since_step = self._quiet[run] = (newest, step)
        if not self.restore_after.elapsed(since_t, now, since_step, step):
            return None
        evidence = self.healthy(run, since_t, now)
        if evidence.harmful:
            self._quiet[run] = (now, step)
            return None
        spec = RestoreLR(factor=RESTORE_FACTOR) if state.lr_scale < 1.0 else DisableClipping()
        details = {"spec": spec.model_dump(mode="json"), "step": step, "lr_scale": state.lr_scale, "evidence": evidence.summary()}
        self._quiet[run] = (now, step)
        if self.mode == "observe":
            self.commands.store.append_audit("restore.observed", time=now, run=run, rule=RESTORE_RULE, details=details)
            return None
        try:
            return self.commands.issue(
                run, spec, reason=f"restoring after the incident: healthy for {self.restore_after}",
                rule=RESTORE_RULE, now=now, evidence=evidence.summary(), step=step,
            )
        except CommandRefused as exc:
            log.info("gradwatch: restoring run %s held: %s", run, exc)
            return None

    def _pinned(self, run: str) -> bool:
        entries = [e for kind in PIN_KINDS for e in self.commands.store.audit(run=run, kind=kind, limit=1, newest_first=True)]
        return bool(entries) and max(entries, key=lambda e: e.time).kind == "remediation.pinned"

    def _abandoned(self, run: str, state: InForce) -> bool:
        return bool(self.commands.store.audit(run=run, kind="remediation.restore_abandoned", since=state.since, limit=1))

    def _abandon(self, run: str, state: InForce, alerts: list[Alert], now: float) -> None:
        if self._abandoned(run, state):
            return
        rules = sorted({a.rule for a in alerts})
        self.commands.store.append_audit(
            "remediation.restore_abandoned", time=now, run=run, rule=RESTORE_RULE,
            details={"alerts": rules, "lr_scale": state.lr_scale, "restores": len(state.restores)},
        )
        log.warning("gradwatch: run %s: %s fired again while restoring; the remediation stays for this incident", run, rules)


def pin(commands: CommandService, run: str, pinned: bool, reason: str, now: float) -> None:
    """An operator keeps (or releases) a run's remediation: the restorer leaves a pinned run as it is."""
    commands.store.append_audit(PIN_KINDS[0] if pinned else PIN_KINDS[1], time=now, run=run, details={"reason": reason})
