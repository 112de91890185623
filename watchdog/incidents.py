"""Incident records: one for every critical alert, with its evidence, its timeline and its outcome.

A critical alert that starts firing for a run opens an incident (or joins the one
open for that run: an explosion fires several rules at once). The record keeps

- the onset: when the earliest of its alerts went pending, and the step then;
- the evidence: the global series (step, loss, global gradient norm and its max
  between scrapes, LR and LR scale, skipped and spike-clipped steps) and the
  per-layer gradient norms and update ratios of the run, from ``PRE_ONSET_S``
  before the onset until it closes. The sample store keeps only what the rules
  need, so the recorder keeps its own short rolling window of these series for
  every run, from which an opening incident takes its past;
- every decision and command with its step (read from the audit log, which
  already holds each of them; see :meth:`IncidentRecorder.timeline`);
- the outcome: ``open`` until its alerts have all resolved, then ``rolled_back``
  (a rollback was applied), ``recovered`` (the loss is back within 2x its level
  before the onset) or ``not_recovered`` (the alerts resolved, the loss did not:
  a damaged run's values become their own reference), or ``stopped`` (a stop was
  applied: closed at once, whatever the alerts do).

Stored in its own table on the store's connection; written once per round while
an incident is open, never on quiet rounds.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import statistics
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.samples import SampleStore
from gradwatch.watchdog.store import CommandTable, Store

PRE_ONSET_S = 300.0
"""Evidence kept from before the onset (the rolling window's length)."""
MAX_POINTS = 5000
"""Points per series in one incident; beyond it the oldest after the onset's window go first."""
MAX_LAYERS = 32
"""Per-layer series recorded: the layers with the largest gradient norm when the incident opens."""
CRITICAL = "critical"
STOPPED_RULE = "GradwatchStoppedRun"

GLOBAL = (mn.STEP, mn.LOSS, mn.GRAD_GLOBAL_NORM, mn.GRAD_GLOBAL_NORM_MAX, mn.LR_SCALE, mn.LEARNING_RATE,
          mn.SKIPPED_STEPS_TOTAL, mn.SPIKE_CLIPPED_STEPS_TOTAL)
LAYERED = (mn.GRAD_NORM, mn.UPDATE_RATIO)
TIMELINE_KINDS = ("alert.", "command.", "notify.", "incident.")

TABLE = [
    """CREATE TABLE IF NOT EXISTS incidents (
        id TEXT PRIMARY KEY, run TEXT NOT NULL, rank TEXT NOT NULL,
        opened_at REAL NOT NULL, onset_at REAL NOT NULL, onset_step INTEGER,
        closed_at REAL, outcome TEXT NOT NULL,
        alerts TEXT NOT NULL,     -- JSON: [{rule, fingerprint, labels, fired_at}]
        evidence TEXT NOT NULL)   -- JSON: {series key: [[time, value], ...]}""",
    "CREATE INDEX IF NOT EXISTS incidents_run ON incidents (run, opened_at)",
]


@dataclass
class Incident:
    id: str
    run: str
    rank: str
    opened_at: float
    onset_at: float
    onset_step: int | None
    closed_at: float | None
    outcome: str
    alerts: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, list[list[float]]] = field(default_factory=dict)

    def step_at(self, t: float) -> int | None:
        """The run's step at time ``t`` (its newest point at or before ``t``), from the evidence."""
        points = self.evidence.get(mn.STEP, [])
        i = bisect.bisect_right([p[0] for p in points], t)
        value = points[i - 1][1] if i else (points[0][1] if points else None)
        return int(value) if value is not None and math.isfinite(value) else None


def series_key(name: str, labels: dict[str, str]) -> str:
    """``gradwatch_grad_norm{layer="rnn.weight_hh_l0"}`` style, for the evidence's keys."""
    shown = {k: v for k, v in labels.items() if k not in (mn.LABEL_RUN, mn.LABEL_RANK)}
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(shown.items())) + "}" if shown else "")


def incident_link(external_url: str, alert: Alert) -> str:
    """Where a notification points for the incident record of ``alert`` (it exists from the round it fires)."""
    return f"{external_url.rstrip('/')}/api/v1/incidents?run={alert.label('run')}&alert={alert.fingerprint}"


def with_incident_link(alert: Alert, external_url: str) -> Alert:
    """A critical alert with an ``incident`` annotation linking to its record (others as they are)."""
    if alert.label("severity") != CRITICAL or not alert.label("run"):
        return alert
    return dataclasses.replace(alert, annotations={**alert.annotations, "incident": incident_link(external_url, alert)})


def stopped_page(incident: Incident, now: float, external_url: str) -> Alert:
    """A critical notification that the ladder's last rung stopped the run: a person must look at it now."""
    rules = ", ".join(sorted({a["rule"] for a in incident.alerts}))
    link = f"{external_url.rstrip('/')}/api/v1/incidents/{incident.id}"
    return Alert(
        rule=STOPPED_RULE,
        labels=(("alertname", STOPPED_RULE), ("run", incident.run), ("severity", CRITICAL)),
        annotations={
            "summary": f"gradwatch stopped run {incident.run}: its remediation could not hold it",
            "description": f"Incident {incident.id} ({rules}) from step {incident.onset_step}: clipping, LR cuts and "
            "the rollbacks its budget allowed did not recover the run; a stop was applied.",
            "incident": link,
        },
        state=AlertState.FIRING, value=float(incident.onset_step or 0), active_at=now, fired_at=now,
    )


class IncidentRecorder:
    """Kept by the service; :meth:`observe` runs once per round after the rules were evaluated."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.commands = CommandTable(store)
        store.ensure_tables(TABLE)
        self._window: dict[tuple[str, str], dict[str, deque[tuple[float, float]]]] = {}
        self._open: dict[str, Incident] = {i.run: i for i in self.list(outcome="open")}

    # -- every round -------------------------------------------------------------------

    def observe(self, now: float, alerts: Iterable[Alert], samples: SampleStore, external_url: str = "") -> list[Alert]:
        """Open, extend and close incidents; returns the pages to send (a run stopped by its remediation)."""
        pages = []
        self._sample(now, samples)
        firing: dict[str, list[Alert]] = {}
        for alert in alerts:
            if alert.state is AlertState.FIRING and alert.label("severity") == CRITICAL and alert.label("run"):
                firing.setdefault(alert.label("run"), []).append(alert)
        for run, run_alerts in firing.items():
            incident = self._open.get(run) or self._start(run, run_alerts, now)
            known = {(a["rule"], a["fingerprint"]) for a in incident.alerts}
            for alert in run_alerts:
                if (alert.rule, alert.fingerprint) not in known:
                    incident.alerts.append({"rule": alert.rule, "fingerprint": alert.fingerprint,
                                            "labels": dict(alert.labels), "fired_at": alert.fired_at})
        for run, incident in list(self._open.items()):
            self._extend(incident)
            outcome = self._outcome(incident)
            if outcome == "stopped" or run not in firing:
                incident.outcome, incident.closed_at = outcome, now
                del self._open[run]
                self.store.append_audit("incident.closed", time=now, run=run,
                                        details={"incident": incident.id, "outcome": outcome})
                if outcome == "stopped":
                    pages.append(stopped_page(incident, now, external_url))
            self._save(incident)
        return pages

    def _sample(self, now: float, samples: SampleStore) -> None:
        """Append this round's newest value of every evidence series to the rolling windows."""
        for name in GLOBAL + LAYERED:
            for series in samples.select(name):
                run, rank = series.label(mn.LABEL_RUN), series.label(mn.LABEL_RANK, "0")
                point = series.latest(now)
                if not run or point is None:
                    continue
                key = series_key(name, dict(series.labels))
                window = self._window.setdefault((run, rank), {}).setdefault(key, deque())
                if window and window[-1][0] >= point[0]:
                    continue
                window.append(point)
                while window and window[0][0] < now - PRE_ONSET_S:
                    window.popleft()

    def _start(self, run: str, alerts: list[Alert], now: float) -> Incident:
        onset_at = min(a.active_at for a in alerts)
        ranks = sorted({a.label(mn.LABEL_RANK, "0") for a in alerts})
        incident = Incident(id=uuid.uuid4().hex[:16], run=run, rank=ranks[0], opened_at=now, onset_at=onset_at,
                            onset_step=None, closed_at=None, outcome="open")
        window = self._window.get((run, "0" if (run, "0") in self._window else incident.rank), {})
        layered = [k for k in window if k.split("{")[0] in LAYERED]
        peak = {k: max((v for _, v in window[k] if math.isfinite(v)), default=0.0) for k in layered
                if k.startswith(mn.GRAD_NORM + "{")}
        keep_layers = {k.split("{", 1)[1] for k in sorted(peak, key=peak.get, reverse=True)[:MAX_LAYERS]}
        for key, points in window.items():
            if key.split("{")[0] in LAYERED and key.split("{", 1)[1] not in keep_layers:
                continue
            incident.evidence[key] = [list(p) for p in points]
        incident.onset_step = incident.step_at(onset_at)
        self._open[run] = incident
        self.store.append_audit("incident.opened", time=now, run=run, rule=alerts[0].rule,
                                fingerprint=alerts[0].fingerprint,
                                details={"incident": incident.id, "onset_at": onset_at, "onset_step": incident.onset_step})
        return incident

    def _extend(self, incident: Incident) -> None:
        window = self._window.get((incident.run, "0"), {}) or self._window.get((incident.run, incident.rank), {})
        for key, recorded in incident.evidence.items():
            last = recorded[-1][0] if recorded else -math.inf
            recorded.extend(list(p) for p in window.get(key, ()) if p[0] > last)
            if len(recorded) > MAX_POINTS:
                del recorded[: len(recorded) - MAX_POINTS]

    def _outcome(self, incident: Incident) -> str:
        outcome = "recovered"
        for record in self.commands.list(run=incident.run, since=incident.onset_at, limit=1000):
            applied = record.ack is not None and record.ack.get("status") == "applied"
            if record.action == "stop" and applied:
                return "stopped"
            if record.action == "rollback" and applied:
                outcome = "rolled_back"
        if outcome == "recovered" and not _loss_recovered(incident):
            outcome = "not_recovered"
        return outcome

    # -- storage ----------------------------------------------------------------------

    def _save(self, incident: Incident) -> None:
        with self.store.transaction():
            self.store._conn.execute(
                """INSERT INTO incidents (id, run, rank, opened_at, onset_at, onset_step, closed_at, outcome, alerts, evidence)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET closed_at=excluded.closed_at, outcome=excluded.outcome,
                     alerts=excluded.alerts, evidence=excluded.evidence""",
                (incident.id, incident.run, incident.rank, incident.opened_at, incident.onset_at, incident.onset_step,
                 incident.closed_at, incident.outcome, json.dumps(incident.alerts), json.dumps(incident.evidence)),
            )

    def list(self, *, run: str | None = None, outcome: str | None = None, alert: str | None = None,
             limit: int = 100) -> list[Incident]:
        """Incidents, newest first; ``alert`` keeps those holding that alert fingerprint."""
        where, params = [], []
        for column, value in (("run", run), ("outcome", outcome)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM incidents" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.store._query(sql + " ORDER BY opened_at DESC LIMIT ?", [*params, limit])
        found = [_incident(r) for r in rows]
        return [i for i in found if alert is None or any(a["fingerprint"] == alert for a in i.alerts)]

    def get(self, incident_id: str) -> Incident | None:
        rows = self.store._query("SELECT * FROM incidents WHERE id = ?", [incident_id])
        return _incident(rows[0]) if rows else None

    def timeline(self, incident: Incident) -> list[dict[str, Any]]:
        """Every alert transition, decision, command, acknowledgement and notification of the run from the
        onset to the close, oldest first, each with its step (an acknowledgement's own; else the run's step then)."""
        until = incident.closed_at + 1e-6 if incident.closed_at is not None else None
        entries = []
        for kind in TIMELINE_KINDS:
            entries += self.store.audit(run=incident.run, kind=kind, since=incident.onset_at, until=until, limit=10_000)
        events = []
        for e in sorted(entries, key=lambda e: e.id):
            step = e.details.get("step") if e.kind == "command.acked" else None
            events.append({"time": e.time, "step": step if step is not None else incident.step_at(e.time),
                           "kind": e.kind, "rule": e.rule, "details": e.details})
        return events


RECOVERED_LOSS = 2.0
"""An incident whose alerts resolved counts as recovered only if the loss is back within this factor of its
median before the onset (the default pack's LossSpike factor): an alert also resolves when a damaged run's
values become their own reference."""


def _loss_recovered(incident: Incident) -> bool:
    points = incident.evidence.get(mn.LOSS, [])
    before = [v for t, v in points if t < incident.onset_at and math.isfinite(v)]
    if not before or not points:
        return True  # no loss reported: the alerts' resolution is all there is to go by
    last = points[-1][1]
    return math.isfinite(last) and last <= RECOVERED_LOSS * statistics.median(before)


def _incident(row) -> Incident:
    data = dict(row)
    data["alerts"] = json.loads(data["alerts"])
    data["evidence"] = json.loads(data["evidence"])
    return Incident(**data)
