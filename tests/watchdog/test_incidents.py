"""Incident records from the recorder's point of view: a clock stepped by hand, real store and samples."""

import math

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandService
from gradwatch.watchdog.incidents import IncidentRecorder, with_incident_link
from gradwatch.watchdog.samples import SampleStore, build_labels
from gradwatch.watchdog.schema import Ack, Rollback, Stop
from gradwatch.watchdog.store import Store

RUN = {"run": "r", "rank": "0"}


def feed(samples: SampleStore, t: float, step: int, norm: float) -> None:
    samples.add(t, mn.STEP, build_labels(RUN), float(step))
    samples.add(t, mn.GRAD_GLOBAL_NORM, build_labels(RUN), norm)
    samples.add(t, mn.GRAD_NORM, build_labels({**RUN, "layer": "w"}), norm / 2)


def critical(rule: str, active_at: float) -> Alert:
    labels = (("rank", "0"), ("run", "r"), ("severity", "critical"))
    return Alert(rule=rule, labels=labels, state=AlertState.FIRING, active_at=active_at, fired_at=active_at + 1)


def setup():
    store = Store(":memory:")
    samples = SampleStore()
    samples.set_retention({}, 0.0)  # the rules need no history: the samples hold only the newest point
    return store, samples, IncidentRecorder(store)


def test_an_incident_keeps_the_evidence_from_before_its_onset_and_closes_recovered():
    store, samples, recorder = setup()
    for t in range(20):
        feed(samples, float(t), 10 * t, 1.0 if t < 15 else math.inf)
        alerts = [critical("A", 15.0)] if t >= 16 else []
        if t >= 17:
            alerts.append(critical("B", 16.0))  # a second rule for the same run joins the incident
        recorder.observe(float(t), alerts, samples)
    (incident,) = recorder.list(run="r")
    assert incident.outcome == "open" and incident.onset_at == 15.0 and incident.onset_step == 150
    assert [a["rule"] for a in incident.alerts] == ["A", "B"]
    norms = incident.evidence[mn.GRAD_GLOBAL_NORM]
    assert [p[0] for p in norms] == [float(t) for t in range(20)]  # from t=0, though the samples kept one point
    assert 'gradwatch_grad_norm{layer="w"}' in incident.evidence
    feed(samples, 20.0, 200, 1.0)
    assert recorder.observe(20.0, [], samples) == []
    (closed,) = recorder.list(run="r")
    assert closed.outcome == "recovered" and closed.closed_at == 20.0
    assert [e.kind for e in store.audit(kind="incident.")] == ["incident.opened", "incident.closed"]


def test_outcomes_follow_the_commands_applied_and_a_stop_is_paged():
    store, samples, recorder = setup()
    commands = CommandService(store, b"secret")
    feed(samples, 0.0, 0, 1.0)
    recorder.observe(0.0, [critical("A", 0.0)], samples)
    for spec, t in ((Rollback(skip_batches=5), 1.0), (Stop(), 2.0)):
        record = commands.issue("r", spec, reason="ladder", rule="A", now=t)
        commands.acknowledge("r", [Ack(command_id=record.id, run="r", rank=0, status="applied", step=3, at=t)], now=t)
        recorder.observe(t, [critical("A", 0.0)], samples)
        if spec.action == "rollback":
            assert recorder.list(run="r")[0].outcome == "open"  # a rollback is not the end: the alert still holds
    (incident,) = recorder.list(run="r")
    assert incident.outcome == "stopped" and incident.closed_at == 2.0
    timeline = recorder.timeline(incident)
    acked = [e for e in timeline if e["kind"] == "command.acked"]
    assert [e["step"] for e in acked] == [3, 3]
    store2, samples2, recorder2 = setup()
    commands2 = CommandService(store2, b"secret")
    feed(samples2, 0.0, 0, 1.0)
    recorder2.observe(0.0, [critical("A", 0.0)], samples2)
    record = commands2.issue("r", Rollback(), reason="ladder", rule="A", now=1.0)
    commands2.acknowledge("r", [Ack(command_id=record.id, run="r", rank=0, status="applied", step=3, at=1.0)], now=1.0)
    assert recorder2.observe(2.0, [], samples2) == []
    assert recorder2.list(run="r")[0].outcome == "rolled_back"


def test_a_stopped_run_is_paged_with_a_link_and_critical_notifications_link_their_record():
    store, samples, recorder = setup()
    commands = CommandService(store, b"secret")
    recorder.observe(0.0, [critical("A", 0.0)], samples)
    record = commands.issue("r", Stop(), reason="ladder", rule="A", now=1.0)
    commands.acknowledge("r", [Ack(command_id=record.id, run="r", rank=0, status="applied", step=3, at=1.0)], now=1.0)
    (page,) = recorder.observe(1.0, [critical("A", 0.0)], samples, external_url="http://wd:9400")
    (incident,) = recorder.list(run="r")
    assert page.label("severity") == "critical" and page.state is AlertState.FIRING
    assert page.annotations["incident"] == f"http://wd:9400/api/v1/incidents/{incident.id}"
    alert = critical("A", 0.0)
    linked = with_incident_link(alert, "http://wd:9400")
    assert linked.annotations["incident"] == f"http://wd:9400/api/v1/incidents?run=r&alert={alert.fingerprint}"
    assert recorder.list(alert=alert.fingerprint) == [incident]
    warning = Alert(rule="W", labels=(("run", "r"), ("severity", "warning")))
    assert with_incident_link(warning, "http://wd:9400") is warning


def test_an_open_incident_survives_a_restart():
    store, samples, recorder = setup()
    recorder.observe(0.0, [critical("A", 0.0)], samples)
    again = IncidentRecorder(store)
    again.observe(1.0, [], samples)
    assert [i.outcome for i in again.list()] == ["recovered"]


def test_alerts_that_resolve_while_the_loss_stays_high_are_not_a_recovery():
    store, samples, recorder = setup()
    for t in range(12):
        samples.add(float(t), mn.LOSS, build_labels(RUN), 0.25 if t < 5 else 1e20)
        recorder.observe(float(t), [critical("A", 5.0)] if 6 <= t < 11 else [], samples)
    assert recorder.list(run="r")[0].outcome == "not_recovered"
