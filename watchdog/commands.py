"""Commands to trainers: issued (signed, numbered, bounded), served to polling agents, acknowledged.

Every decision, delivery and acknowledgement goes to the audit log. The watchdog's
own bounds — a cap per run per window and a cooldown per (run, action) — hold for
rule policies and Alertmanager-triggered commands; operators' manual commands skip
them (the agent's bounds still apply to everything).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from gradwatch.watchdog.schema import Ack, Action, Command, CommandBatch, SignedCommand
from gradwatch.watchdog.store import CommandRecord, CommandTable, Store


@dataclass(frozen=True)
class CommandLimits:
    max_per_run: int = 6
    """At most this many bounded commands per run within ``window_s``."""
    window_s: float = 600.0
    cooldown_s: float = 15.0
    """Minimum time between two bounded commands with the same action for one run."""
    ttl_s: float = 120.0
    """A command not picked up within this long expires (the situation it answered has moved on)."""
    poll_interval_s: float = 1.0


FAILED_STATUSES = frozenset({"refused", "rejected", "unsupported", "expired"})


def failed(record: CommandRecord, now: float) -> bool:
    """The command did not take effect: the agent turned it down, or it expired unread."""
    if record.ack is not None:
        return record.ack.get("status") in FAILED_STATUSES
    return record.delivered_at is None and record.expires_at < now


class CommandRefused(Exception):
    """The watchdog will not issue this command; the message says why."""


class CommandService:
    def __init__(self, store: Store, secret: bytes | None, limits: CommandLimits = CommandLimits(), clock=time.time):
        self.store = store
        self.table = CommandTable(store)
        self.secret = secret
        self.limits = limits
        self.clock = clock

    @property
    def enabled(self) -> bool:
        """Without a shared secret no command can be signed: the watchdog notifies only."""
        return self.secret is not None

    def issue(
        self,
        run: str,
        spec: Action,
        *,
        reason: str,
        rule: str | None = None,
        fingerprint: str | None = None,
        bounded: bool = True,
        now: float | None = None,
        evidence: str | None = None,
        step: int | None = None,
    ) -> CommandRecord:
        """Sign and queue one command; ``evidence`` (why it is warranted) and ``step`` (the run's step
        at the decision) go to the audit. Raises :class:`CommandRefused` past the bounds."""
        now = self.clock() if now is None else now
        if self.secret is None:
            raise CommandRefused("no command secret configured (GRADWATCH_SECRET): remediation is disabled")
        if bounded:
            self._check_bounds(run, spec.action, now)
        with self.store.transaction():
            seq = self.table.next_seq(run)
            command = Command(
                id=uuid.uuid4().hex, run=run, seq=seq, spec=spec, reason=reason[:512],
                issued_at=now, expires_at=now + self.limits.ttl_s,
            )
            signed = SignedCommand.sign(command, self.secret)
            record = CommandRecord(
                id=command.id, run=run, seq=seq, action=spec.action, rule=rule, fingerprint=fingerprint,
                issued_at=now, expires_at=command.expires_at, signed=signed.model_dump_json(),
                delivered_at=None, ack=None,
            )
            self.table.add(record)
            self.store.append_audit(
                "command.decided", time=now, run=run, rule=rule, fingerprint=fingerprint,
                details={
                    "command_id": command.id, "seq": seq, "spec": spec.model_dump(mode="json"), "reason": reason,
                    **({"evidence": evidence} if evidence is not None else {}),
                    **({"step": step} if step is not None else {}),
                },
            )
        return record

    def _check_bounds(self, run: str, action: str, now: float) -> None:
        # A command the agent refused (or that expired unread) took no effect: it uses up neither.
        recent = [r for r in self.table.list(run=run, since=now - self.limits.window_s, limit=1000) if not failed(r, now)]
        if len(recent) >= self.limits.max_per_run:
            raise CommandRefused(f"{len(recent)} commands for {run!r} within {self.limits.window_s:g} s (max {self.limits.max_per_run})")
        same = [r for r in recent if r.action == action and now - r.issued_at < self.limits.cooldown_s]
        if same:
            raise CommandRefused(f"cooldown: {action} issued for {run!r} {now - same[0].issued_at:.0f} s ago")

    def poll(self, run: str, rank: int, after: int, now: float | None = None) -> CommandBatch:
        """What an agent polling with ``after=<last seq>`` should get; first deliveries are audited."""
        now = self.clock() if now is None else now
        records = self.table.after(run, after, now)
        for command_id in self.table.mark_delivered([r.id for r in records], now):
            self.store.append_audit(
                "command.delivered", time=now, run=run, details={"command_id": command_id, "rank": rank}
            )
        return CommandBatch(
            commands=[SignedCommand.model_validate_json(r.signed) for r in records],
            poll_interval_s=self.limits.poll_interval_s,
        )

    def acknowledge(self, run: str, acks: list[Ack], now: float | None = None) -> int:
        """Record acknowledgements (each audited); returns how many were new."""
        now = self.clock() if now is None else now
        new = 0
        for ack in acks:
            if ack.run != run:
                raise ValueError(f"acknowledgement for run {ack.run!r} posted under {run!r}")
            record = self.table.get(ack.command_id)
            first = self.table.record_ack(ack.command_id, ack.model_dump_json()) if record else False
            new += first
            self.store.append_audit(
                "command.acked", time=now, run=run,
                rule=record.rule if record else None, fingerprint=record.fingerprint if record else None,
                details={**ack.model_dump(mode="json"), "known": record is not None, "first": first},
            )
        return new
