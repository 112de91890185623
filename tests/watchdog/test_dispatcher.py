"""The dispatcher: never blocks the evaluation loop, retries, de-duplicates across restarts, audits."""

from __future__ import annotations

import random
import threading
import time

import pytest

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.notify.config import build_notifier, parse_notifiers
from gradwatch.watchdog.notify.dispatcher import Backoff, Dispatcher
from gradwatch.watchdog.store import Store
from tests.integration.servers import free_port
from tests.receiver import Receiver

FAST = Backoff(base_s=0.02, max_s=0.1)


class Clock:
    """A settable clock: repeat intervals are checked without waiting for them."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def firing(layer: str = "fc1.weight", fired_at: float = 1_700_000_000.0) -> Alert:
    return Alert(
        rule="GradientExplosion",
        labels=(("alertname", "GradientExplosion"), ("layer", layer), ("run", "r1")),
        state=AlertState.FIRING,
        active_at=fired_at - 10,
        fired_at=fired_at,
    )


def resolved(alert: Alert, at: float) -> Alert:
    alert.state, alert.resolved_at = AlertState.INACTIVE, at
    return alert


def webhook(url: str, **extra):
    [cfg] = parse_notifiers([{"type": "webhook", "url": url, **extra}])
    return build_notifier(cfg)


class BlockingNotifier:
    """Records batches; ``send`` waits on ``release`` so a test can hold a delivery in flight."""

    def __init__(self, name: str = "blocking") -> None:
        self.name, self.send_resolved, self.repeat_interval_s = name, True, 3600.0
        self.started, self.release = threading.Event(), threading.Event()
        self.batches: list[list[str]] = []

    def send(self, alerts, now):
        self.started.set()
        self.release.wait(10)
        self.batches.append([a.label("layer") for a in alerts])

    def close(self):
        pass


@pytest.fixture
def store():
    with Store(":memory:") as s:
        yield s


def test_retries_with_backoff_until_the_receiver_recovers(receiver, store):
    receiver.fail_next(2)
    d = Dispatcher([webhook(receiver.url, name="hook")], store, backoff=FAST, seed=1)
    d.submit([firing()], 0)
    receiver.wait_for(1, timeout=5)
    assert d.flush(2)
    assert [r.status for r in receiver.requests] == [500, 500, 200]
    stats = d.stats()["hook"]
    assert (stats.failures_total, stats.sent_total, stats.consecutive_failures) == (2, 1, 0)
    assert "500" in stats.last_error
    log = store.audit(kind="notify.")
    assert [(e.kind, e.details["attempt"]) for e in log] == [("notify.failed", 1), ("notify.failed", 2), ("notify.sent", 3)]
    assert log[0].details["retry_in_s"] <= log[1].details["retry_in_s"]
    assert {e.run for e in log} == {"r1"} and {e.details["notifier"] for e in log} == {"hook"}
    assert d.close(2)


def test_backoff_doubles_with_jitter_up_to_a_cap():
    rng, b = random.Random(0), Backoff(base_s=1.0, max_s=8.0)
    for failures, (lo, hi) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (4, 8), 9: (4, 8)}.items():
        delays = [b.delay(failures, rng) for _ in range(50)]
        assert lo <= min(delays) and max(delays) <= hi
        assert len(set(delays)) > 1  # jittered


def test_dead_notifiers_never_block_submit_or_the_healthy_one(receiver, store):
    with Receiver() as black_hole:
        black_hole.hang = True
        dead = webhook(f"http://127.0.0.1:{free_port()}", name="dead")
        hanging = webhook(black_hole.url, name="hanging", timeout=30)
        d = Dispatcher([dead, hanging, webhook(receiver.url, name="ok")], store, backoff=FAST)
        for i in range(20):
            started = time.monotonic()
            d.submit([firing(layer=f"l{i}")], 0)
            assert time.monotonic() - started < 0.25  # queued, not sent: the hanging request takes 30 s
        receiver.wait_for(1, timeout=5)
        black_hole.wait_for_hung(1)
        deadline = time.monotonic() + 5
        while d.stats()["dead"].failures_total < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = d.stats()
        assert stats["dead"].failures_total >= 2 and "Connect" in stats["dead"].last_error
        assert stats["dead"].sent_total == 0
        assert stats["hanging"].sent_total == 0
        assert d.flush(0.1) is False  # the dead ones still hold their alerts
        assert d.close(0.5) is False  # the hanging request outlives close: abandoned, not waited for
        assert d.stats()["dead"].dropped_total > 0  # given up at shutdown, counted


def test_full_queue_drops_oldest_and_counts_it(store):
    n = BlockingNotifier()
    d = Dispatcher([n], store, max_queue=3)
    d.submit([firing(layer="first")], 0)
    assert n.started.wait(5)  # "first" is in flight; the queue is empty again
    d.submit([firing(layer=f"l{i}") for i in range(5)], 0)
    assert d.stats()["blocking"].dropped_total == 2
    assert d.stats()["blocking"].queued == 3
    n.release.set()
    assert d.flush(5)
    assert n.batches == [["first"], ["l2", "l3", "l4"]]
    assert d.close(2)
    [drop] = store.audit(kind="notify.dropped")
    assert drop.details["count"] == 2


def test_no_resend_after_restart_until_repeat_interval(receiver, tmp_path):
    path, clock, alert = tmp_path / "watchdog.db", Clock(), firing()
    store = Store(path)
    d = Dispatcher([webhook(receiver.url, repeat_interval="1h")], store, clock)
    d.submit([alert], clock.t)
    receiver.wait_for(1)
    d.close(2)
    store.close()

    # A new process: same store file, the engine restored the same firing alert.
    clock.t += 600
    store = Store(path)
    d = Dispatcher([webhook(receiver.url, repeat_interval="1h")], store, clock)
    d.submit([alert], clock.t)
    assert d.flush(2)
    assert len(receiver.requests) == 1
    clock.t += 3000  # one hour after the first delivery
    d.submit([alert], clock.t)
    receiver.wait_for(2)
    clock.t += 60
    d.submit([resolved(alert, clock.t)], clock.t)
    requests = receiver.wait_for(3)
    assert requests[-1].json()["status"] == "resolved"
    d.close(2)
    store.close()

    store = Store(path)
    d = Dispatcher([webhook(receiver.url, repeat_interval="1h")], store, clock)
    d.submit([alert], clock.t)  # the resolution was delivered already
    assert d.flush(2)
    assert len(receiver.requests) == 3
    d.close(2)
    store.close()


def test_repeat_interval_resends_and_a_new_episode_is_news(receiver, store):
    clock = Clock()
    d = Dispatcher([webhook(receiver.url, repeat_interval="10m")], store, clock)

    def submit_and_count(alert: Alert) -> int:
        d.submit([alert], clock.t)
        assert d.flush(2)
        return len(receiver.requests)

    alert = firing(fired_at=clock.t)
    assert submit_and_count(alert) == 1
    clock.t += 599
    assert submit_and_count(alert) == 1
    clock.t += 1
    assert submit_and_count(alert) == 2
    clock.t += 5
    assert submit_and_count(resolved(alert, clock.t)) == 3
    assert submit_and_count(alert) == 3  # resolution is sent once
    clock.t += 5
    assert submit_and_count(firing(fired_at=clock.t)) == 4  # fired again within the repeat interval
    assert [r.json()["status"] for r in receiver.requests] == ["firing", "firing", "resolved", "firing"]
    d.close(2)


def test_resolution_only_to_notifiers_that_want_it_and_heard_it_fire(store):
    want, mute = BlockingNotifier("want"), BlockingNotifier("mute")
    mute.send_resolved = False
    for n in (want, mute):
        n.release.set()
    d = Dispatcher([want, mute], store)
    d.submit([resolved(firing(layer="never-told"), 5)], 0)  # nobody heard it fire
    alert = firing(layer="told")
    d.submit([alert], 0)
    assert d.flush(2)
    d.submit([resolved(alert, 5)], 0)
    assert d.flush(2)
    assert want.batches == [["told"], ["told"]]
    assert mute.batches == [["told"]]
    d.close(2)


def test_pending_alerts_are_not_sent_and_submit_snapshots(store):
    n = BlockingNotifier()
    n.release.set()
    d = Dispatcher([n], store)
    pending = firing(layer="pending")
    pending.state = AlertState.PENDING
    alert = firing(layer="a")
    d.submit([pending, alert], 0)
    alert.labels = (("layer", "mutated"),)  # the engine keeps working on its own objects
    assert d.flush(2)
    assert n.batches == [["a"]]
    d.close(2)


def test_close_is_prompt_while_a_notifier_backs_off(store):
    d = Dispatcher([webhook(f"http://127.0.0.1:{free_port()}", name="dead")], store, backoff=Backoff(base_s=60, max_s=60))
    d.submit([firing()], 0)
    deadline = time.monotonic() + 5
    while d.stats()["dead"].failures_total < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    assert d.close(5) is True
    assert time.monotonic() - started < 2  # not the 30-60 s backoff
    assert d.stats()["dead"].dropped_total == 1
    assert [e.kind for e in store.audit()] == ["notify.failed", "notify.failed", "notify.dropped"]
