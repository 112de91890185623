"""The rule engine: at each evaluation, every rule's condition, then its alert state machine.

The service calls :meth:`RuleEngine.eval` once per evaluation interval with the clock
and the sample store; notifiers get :meth:`RuleEngine.alerts_to_send`; the state store
saves :meth:`RuleEngine.alerts` and gives them back to :meth:`RuleEngine.restore` after
a restart. A rule that raises is marked unhealthy and its alerts stay as they were —
neither firing nor resolving on a broken evaluation — while the other rules go on
(Prometheus's rule-group behaviour). Not thread-safe: one evaluation loop owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.alerting import (
    DEFAULT_RESEND_DELAY_S,
    RESOLVED_RETENTION_S,
    AlertingRule,
    AlertLimitExceeded,
    Changes,
)
from gradwatch.watchdog.rules.conditions import evaluate
from gradwatch.watchdog.rules.conditions import history_needed as rule_history
from gradwatch.watchdog.rules.models import Rule
from gradwatch.watchdog.samples import SampleStore


@dataclass
class RuleHealth:
    """How a rule's last evaluation went (Prometheus's rule health: unknown before the first)."""

    state: Literal["unknown", "ok", "err"] = "unknown"
    last_error: str | None = None
    errors_total: int = 0
    last_duration_s: float = 0.0
    last_eval_at: float | None = None


@dataclass
class EvalResult:
    """What one :meth:`RuleEngine.eval` did, as copies of the alerts.

    ``changed``: alerts that became pending, fired or resolved now (state on the record).
    ``dropped``: alerts forgotten now (pending whose condition cleared, resolved past
    retention, or all of a rule over its ``limit``). ``errors``: rule name → error text.
    """

    changed: list[Alert] = field(default_factory=list)
    dropped: list[Alert] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def fired(self) -> list[Alert]:
        """Alerts that started firing at this evaluation (what remediation reacts to)."""
        return [a for a in self.changed if a.state == AlertState.FIRING]

    @property
    def resolved(self) -> list[Alert]:
        return [a for a in self.changed if a.state == AlertState.INACTIVE]

    def _add(self, changes: Changes) -> None:
        self.changed += changes.changed
        self.dropped += changes.dropped


@dataclass
class _Entry:
    rule: Rule
    alerting: AlertingRule
    health: RuleHealth = field(default_factory=RuleHealth)


class RuleEngine:
    """Evaluates a list of rules against a :class:`SampleStore`, keeping each rule's alerts."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        resolved_retention_s: float = RESOLVED_RETENTION_S,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._retention_s = resolved_retention_s
        self._timer = timer  # only measures durations; alert times come from eval's `now`
        self._entries: dict[str, _Entry] = {}
        self._retired: list[AlertingRule] = []
        self.replace_rules(rules)

    @property
    def rules(self) -> list[Rule]:
        return [e.rule for e in self._entries.values()]

    def eval(self, now: float, store: SampleStore) -> EvalResult:
        """Evaluate every rule at ``now``; a rule that raises is recorded in ``errors`` and its health."""
        result = EvalResult()
        for name, entry in self._entries.items():
            started = self._timer()
            try:
                changes = entry.alerting.eval(now, evaluate(entry.rule, store, now))
            except Exception as exc:  # contain any rule's failure: the others must still run
                if isinstance(exc, AlertLimitExceeded):
                    result.dropped += exc.dropped
                error = f"{type(exc).__name__}: {exc}"
                result.errors[name] = error
                entry.health.state, entry.health.last_error = "err", error
                entry.health.errors_total += 1
            else:
                result._add(changes)
                entry.health.state, entry.health.last_error = "ok", None
            entry.health.last_duration_s = self._timer() - started
            entry.health.last_eval_at = now
        for retired in list(self._retired):
            result._add(retired.eval(now, ()))  # no matches: firing alerts resolve, then age out
            if not retired.alerts():
                self._retired.remove(retired)
        return result

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Switch to ``rules`` (a reload). Raises ValueError on duplicate names, changing nothing.

        An unchanged rule keeps its alerts and health. A changed rule with the same name
        and labels takes over the old alerts, as Prometheus does across a reload, so a
        still-true alert keeps firing and a no-longer-true one resolves normally. Alerts
        of removed rules (or rules whose labels changed) resolve at the next evaluation,
        so their resolution is still sent.
        """
        rules = list(rules)
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate rule names: {', '.join(dup)}")
        old, entries = dict(self._entries), {}
        for rule in rules:
            prev = old.pop(rule.name, None)
            if prev is not None and prev.rule == rule:
                entries[rule.name] = prev
                continue
            entry = _Entry(rule, self._build(rule))
            if prev is not None and prev.rule.labels == rule.labels:
                entry.alerting.adopt(prev.alerting)
            elif prev is not None:
                self._retire(prev.alerting)
            entries[rule.name] = entry
        for prev in old.values():
            self._retire(prev.alerting)
        self._entries = entries

    def history_needed(self) -> dict[str, float]:
        """Each metric the loaded rules read → seconds of history the longest reader needs.

        For :meth:`SampleStore.set_retention`, after start-up and after every
        :meth:`replace_rules`: metrics missing here are read by no rule, so the store
        can keep just their current value.
        """
        need: dict[str, float] = {}
        for entry in self._entries.values():
            for metric, seconds in rule_history(entry.rule).items():
                need[metric] = max(need.get(metric, 0.0), seconds)
        return need

    def alerts(self) -> list[Alert]:
        """Copies of every alert held: pending, firing, and resolved ones within retention."""
        out = [a for e in self._entries.values() for a in e.alerting.alerts()]
        return out + [a for r in self._retired for a in r.alerts()]

    def alerts_to_send(self, now: float, resend_delay_s: float = DEFAULT_RESEND_DELAY_S) -> list[Alert]:
        """Alerts due to be sent now (see :func:`~gradwatch.watchdog.alerting.needs_sending`); marks them sent."""
        holders = [e.alerting for e in self._entries.values()] + self._retired
        return [a for h in holders for a in h.alerts_to_send(now, resend_delay_s)]

    def restore(self, alerts: Iterable[Alert]) -> int:
        """Take back saved alerts (after a restart); returns how many were restored.

        A restored firing alert stays firing until its rule's window has refilled with
        fresh samples (:func:`restore_hold_s`) unless its condition is seen again first.
        Alerts of rules no longer loaded are held as retired, so they resolve at the next
        evaluation and their resolution is sent.
        """
        by_rule: dict[str, list[Alert]] = {}
        for a in alerts:
            by_rule.setdefault(a.rule, []).append(a)
        n = 0
        for name, group in by_rule.items():
            entry = self._entries.get(name)
            if entry is not None:
                n += entry.alerting.restore(group, hold_s=restore_hold_s(entry.rule))
            else:
                holder = AlertingRule(name, resolved_retention_s=self._retention_s)
                n += holder.restore(group)
                self._retire(holder)
        return n

    def health(self) -> dict[str, RuleHealth]:
        """Each loaded rule's health, by name (copies)."""
        return {name: RuleHealth(**vars(e.health)) for name, e in self._entries.items()}

    def _build(self, rule: Rule) -> AlertingRule:
        return build_alerting_rule(rule, resolved_retention_s=self._retention_s)

    def _retire(self, holder: AlertingRule) -> None:
        holder.keep_firing_for_s = 0.0  # a rule that is gone cannot keep anything firing
        if holder.alerts():
            self._retired.append(holder)


def restore_hold_s(rule: Rule) -> float:
    """How long after a restart a firing alert of ``rule`` may go unconfirmed: the window its
    condition reads (counter increase, spike, plateau, stall); 0 for kinds that read only
    current values, which the first scrape brings back."""
    return float(getattr(rule, "window", 0.0))


def build_alerting_rule(rule: Rule, *, resolved_retention_s: float = RESOLVED_RETENTION_S) -> AlertingRule:
    """The state machine for one rule definition."""
    return AlertingRule(
        rule.name,
        for_s=rule.for_,
        keep_firing_for_s=rule.keep_firing_for,
        annotations=rule.annotations,
        limit=rule.limit,
        resolved_retention_s=resolved_retention_s,
    )
