"""The service, one round at a time: a fake clock, a real agent-like /metrics endpoint, real store and notifier.

Every test drives :meth:`Service.tick` with explicit times; the webhook goes to the
local receiver. A "restart" is a second Service on the same SQLite file while the
first is abandoned without closing (as after SIGKILL); the first is closed only at
the end, for cleanup.
"""

from __future__ import annotations

import threading
import time

import pytest

from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.config_file import parse_config
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings
from tests.integration.servers import free_port
from tests.watchdog.fakes import T0, Clock, FakeAgent

RULES = """
rules:
  - name: LossHigh
    kind: threshold
    metric: gradwatch_loss
    op: above
    value: 10
    for: 4s
    labels: {severity: warning}
    annotations: {summary: "loss {{ $value }} in {{ $labels.run }}"}
"""


@pytest.fixture
def services():
    """Builds services and closes every one at the end, even those a test 'killed'."""
    built: list[Service] = []

    def build(settings: Settings, config_text: str | None, clock: Clock) -> Service:
        """``config_text`` None: the service reads ``settings.config`` itself (as serve does)."""
        config = parse_config(config_text) if config_text is not None else None
        service = Service(settings, config, clock=clock, external_url="http://watchdog.test")
        built.append(service)
        return service

    yield build
    for service in built:
        service.close()


def settings_for(tmp_path, **extra) -> Settings:
    return Settings(db=str(tmp_path / "gradwatch.db"), scrape_interval=1.0, scrape_timeout=2.0, **extra)


def webhook(url: str) -> str:
    return f"notifiers:\n  - type: webhook\n    url: {url}/hook\n"


def register(service: Service, fake_agent: FakeAgent) -> None:
    service.register(Registration(run="r1", rank=0, metrics_url=fake_agent.url, step=0))


def kinds(service: Service, **filters) -> list[str]:
    return [e.kind for e in reversed(service.audit(**filters))]  # oldest first


def fire(service: Service, fake_agent: FakeAgent, clock: Clock) -> None:
    """Loss 50 from T0: pending at T0, firing at T0+4 (for: 4s)."""
    fake_agent.loss.set(50.0)
    for t in (T0, T0 + 2, T0 + 4):
        clock.t = t
        service.tick()


def test_registration_is_persisted_scraped_and_restored(tmp_path, fake_agent, services):
    clock = Clock()
    service = services(settings_for(tmp_path), RULES, clock)
    register(service, fake_agent)
    fake_agent.step.set(42)
    report = service.tick()
    assert report.samples == 2 and report.scrape_errors == {}
    (run,) = service.runs()
    assert (run.record.run, run.record.rank, run.record.last_step, run.record.stale) == ("r1", 0, 42, False)
    assert kinds(service, run="r1") == ["run.registered"]

    # A restarted watchdog knows the run and scrapes it without a new registration.
    restarted = services(settings_for(tmp_path), RULES, Clock(T0 + 10))
    assert restarted.tick().samples == 2


def test_alert_transitions_are_audited_and_notified(tmp_path, fake_agent, receiver, services):
    clock = Clock()
    service = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    register(service, fake_agent)
    fire(service, fake_agent, clock)
    (alert,) = service.alerts(run="r1")
    assert alert.state == AlertState.FIRING and alert.fired_at == T0 + 4
    assert service.dispatcher.flush()
    (request,) = receiver.wait_for(1)
    assert request.json()["alerts"][0]["labels"]["alertname"] == "LossHigh"

    fake_agent.loss.set(1.0)
    clock.t = T0 + 6
    service.tick()
    assert [a.state for a in service.alerts(state="resolved")] == [AlertState.INACTIVE]
    assert service.dispatcher.flush()
    assert receiver.wait_for(2)[1].json()["status"] == "resolved"
    assert kinds(service, kind="alert.") == ["alert.pending", "alert.firing", "alert.resolved"]
    assert kinds(service, kind="notify.") == ["notify.sent", "notify.sent"]
    history = service.alert_history(run="r1")
    assert [e.kind for e in history] == ["alert.resolved", "alert.firing", "alert.pending"]
    assert history[1].details["value"] == "50.0"


def test_a_pending_alert_that_clears_is_audited_as_dropped(tmp_path, fake_agent, services):
    clock = Clock()
    service = services(settings_for(tmp_path), RULES, clock)
    register(service, fake_agent)
    fake_agent.loss.set(50.0)
    service.tick()
    fake_agent.loss.set(1.0)
    clock.t += 2
    service.tick()
    assert service.alerts() == []
    assert kinds(service, kind="alert.") == ["alert.pending", "alert.dropped"]


def test_restart_keeps_firing_alerts_and_does_not_resend(tmp_path, fake_agent, receiver, services):
    clock = Clock()
    first = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    register(first, fake_agent)
    fire(first, fake_agent, clock)
    assert first.dispatcher.flush()
    receiver.wait_for(1)
    # `first` is abandoned here, as if killed: nothing is closed or flushed.

    clock.t = T0 + 30
    second = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    (alert,) = second.alerts()
    assert alert.state == AlertState.FIRING and alert.fired_at == T0 + 4
    second.offer_restored_alerts()  # as start() does: already delivered, so skipped
    for _ in range(3):
        clock.t += 2
        second.tick()
    assert second.dispatcher.flush()
    assert len(receiver.requests) == 1
    assert [a.state for a in second.alerts()] == [AlertState.FIRING]
    assert kinds(second, kind="alert.") == ["alert.pending", "alert.firing"]  # no second pending/firing

    fake_agent.loss.set(1.0)
    clock.t += 2
    second.tick()
    assert second.dispatcher.flush()
    assert [r.json()["status"] for r in receiver.wait_for(2)] == ["firing", "resolved"]


def test_a_notification_lost_in_a_crash_is_sent_after_restart(tmp_path, fake_agent, receiver, services):
    clock = Clock()
    dead = f"http://127.0.0.1:{free_port()}"
    first = services(settings_for(tmp_path), RULES + webhook(dead), clock)
    register(first, fake_agent)
    fire(first, fake_agent, clock)  # fired, handed to a notifier that cannot deliver

    clock.t = T0 + 10
    second = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    second.offer_restored_alerts()  # as start() does
    (request,) = receiver.wait_for(1)
    assert request.json()["alerts"][0]["status"] == "firing"


def test_reloading_a_bad_file_keeps_the_old_rules_and_their_alerts(tmp_path, fake_agent, services):
    path = tmp_path / "gradwatch.yaml"
    path.write_text(RULES)
    clock = Clock()
    service = services(settings_for(tmp_path, config=path), None, clock)
    register(service, fake_agent)
    fire(service, fake_agent, clock)

    path.write_text(RULES.replace("for: 4s", "for: soon"))
    result = service.reload()
    assert not result.ok and result.rules == 1
    (problem,) = result.problems
    assert (problem.location, problem.line) == ("rules[0].for", 8)
    clock.t += 2
    service.tick()
    assert [a.state for a in service.alerts()] == [AlertState.FIRING]

    # A valid file that keeps LossHigh unchanged and adds a rule: the alert keeps firing.
    path.write_text(RULES + "  - name: Stalled\n    kind: stall\n")
    assert service.reload().ok
    clock.t += 2
    service.tick()
    assert [(a.rule, a.state, a.fired_at) for a in service.alerts()] == [("LossHigh", AlertState.FIRING, T0 + 4)]
    assert [r.name for r in service.engine.rules] == ["LossHigh", "Stalled"]
    entries = {e.kind: e for e in service.audit(kind="config.")}
    assert entries["config.reloaded"].details["added"] == ["Stalled"]
    assert "rules[0].for (line 8)" in entries["config.reload_failed"].details["problems"][0]


def test_a_dead_target_becomes_stale_and_comes_back_on_registration(tmp_path, services):
    clock = Clock()
    service = services(settings_for(tmp_path, stale_after=10), RULES, clock)
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    service.register(Registration(run="gone", rank=0, metrics_url=dead))
    for t in (T0, T0 + 5, T0 + 10):
        clock.t = t
        report = service.tick()
    assert "gone" in str(report.scrape_errors)
    (run,) = service.runs()
    assert run.record.stale and run.last_error
    assert kinds(service, run="gone") == ["run.registered", "run.stale"]

    service.register(Registration(run="gone", rank=0, metrics_url=dead))
    assert not service.runs()[0].record.stale


def test_a_hanging_notifier_never_blocks_a_round(tmp_path, fake_agent, receiver, services):
    receiver.hang = True
    clock = Clock()
    service = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    register(service, fake_agent)
    fire(service, fake_agent, clock)
    receiver.wait_for_hung(1)

    done = threading.Event()

    def more_rounds() -> None:
        for _ in range(3):
            clock.t += 2
            service.tick()
        done.set()

    threading.Thread(target=more_rounds, daemon=True).start()
    assert done.wait(10), "rounds blocked behind a hanging notifier"
    assert receiver.hung == 1
    receiver.stop()  # releases the held request, so closing the service need not wait it out


def test_own_metrics_and_health(tmp_path, fake_agent, receiver, services):
    clock = Clock()
    service = services(settings_for(tmp_path), RULES + webhook(receiver.url), clock)
    register(service, fake_agent)
    service.register(Registration(run="gone", rank=0, metrics_url=f"http://127.0.0.1:{free_port()}/metrics"))
    fire(service, fake_agent, clock)
    assert service.dispatcher.flush()
    value = service.metrics.registry.get_sample_value
    assert value("gradwatch_watchdog_scrapes_total", {"run": "r1", "rank": "0"}) == 3
    assert value("gradwatch_watchdog_scrape_failures_total", {"run": "gone", "rank": "0"}) == 3
    assert value("gradwatch_watchdog_scrape_failures_total", {"run": "r1", "rank": "0"}) == 0
    assert value("gradwatch_watchdog_notifications_sent_total", {"notifier": "webhook"}) == 1
    assert value("gradwatch_watchdog_notifications_failed_total", {"notifier": "webhook"}) == 0
    assert value("gradwatch_watchdog_rule_healthy", {"rule": "LossHigh"}) == 1
    assert value("gradwatch_watchdog_alerts", {"state": "firing"}) == 1
    assert value("gradwatch_watchdog_runs", {"state": "live"}) == 2
    assert value("gradwatch_watchdog_evaluation_duration_seconds_count") == 3

    health = service.health()
    assert health.status == "ok" and health.source == "scrape" and health.runs == 2
    assert health.rules["LossHigh"].state == "ok"
    assert health.notifiers["webhook"]["sent_total"] == 1


def test_the_loop_runs_rounds_and_closes_promptly(tmp_path, fake_agent):
    service = Service(Settings(db=str(tmp_path / "gradwatch.db"), scrape_interval="50ms"), parse_config(RULES))
    try:
        register(service, fake_agent)
        assert service.health().status == "starting"
        service.start()
        for _ in range(100):
            if service.snapshot().last_round is not None and service.runs()[0].record.last_step is not None:
                break
            time.sleep(0.05)
        assert service.health().status == "ok"
    finally:
        service.close()
    assert not service._thread.is_alive()
