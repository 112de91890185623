"""Hostile scrape targets on loopback against the real scrape source, registry and service.

Each test is one attack from the hardening pass (issue 13): a target trickling its
headers, a crowd of black holes, a target writing another run's series, label churn,
a registration flood, and a target whose answer would leak into ``last_error``.
"""

from __future__ import annotations

import itertools
import time

import pytest
from gradwatch.watchdog.samples import SampleStore
from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.service import Service
from gradwatch.watchdog.settings import Settings
from gradwatch.watchdog.sources.scrape import ScrapeSource, TargetLimits
from gradwatch.watchdog.sources.targets import RegistryFull, TargetRegistry

from tests.hostile import HostileTarget, black_hole, response, serving, trickling
from tests.integration.servers import free_port
from tests.integration.watchdog_process import wait_until
from tests.watchdog.fakes import T0, Clock

HEALTHY = ("healthy", 0)
PASSWD = b"root:x:0:0:root:/root:/bin/bash\n"


def _register(registry: TargetRegistry, key: tuple[str, int], url: str, now: float = T0) -> None:
    registry.register(Registration(run=key[0], rank=key[1], metrics_url=url), now)


@pytest.fixture
def stack():
    """Targets and sources started by a test, stopped at its end in reverse order."""
    started: list = []
    yield started
    for thing in reversed(started):
        thing.close() if hasattr(thing, "close") else thing.stop()


def _healthy(stack) -> HostileTarget:
    target = serving(b'gradwatch_step{run="healthy",rank="0"} 7\n')
    stack.append(target)
    return target


def _source(stack, registry: TargetRegistry, store: SampleStore | None = None, **kwargs) -> ScrapeSource:
    source = ScrapeSource(registry, store if store is not None else SampleStore(), **kwargs)
    stack.append(source)
    return source


def _step(store: SampleStore, run: str) -> list[tuple[float, float]]:
    return [p for s in store.select("gradwatch_step", {"run": run}) for p in s.points]


def test_a_target_trickling_its_status_line_is_cut_off_at_the_deadline(stack):
    # 1 byte every 0.2 s: each read answers well within any per-read timeout, the
    # headers alone take ~20 s. The deadline (1 s) covers the whole exchange.
    slow = trickling(every_s=0.2)
    stack.append(slow)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("slow", 0), slow.url)
    _register(registry, HEALTHY, _healthy(stack).url)
    source = _source(stack, registry, store, timeout_s=1.0)

    result = source.scrape_all(T0)

    assert result.errors == {("slow", 0): "timed out after 1 s"}
    assert _step(store, "healthy") == [(T0, 7.0)]  # stored in the very round the slow one failed
    assert _step(store, "slow") == []
    wait_until("the trickling target sees the watchdog hang up", lambda: slow.hung_up == 1)


def test_rounds_after_a_target_ran_into_the_deadline_do_not_wait_for_it(stack):
    slow = trickling(every_s=0.2)
    stack.append(slow)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("slow", 0), slow.url)
    _register(registry, HEALTHY, _healthy(stack).url)
    source = _source(stack, registry, store, timeout_s=1.0)
    assert ("slow", 0) in source.scrape_all(T0).errors  # its first scrape: waited for, up to the deadline

    second = source.scrape_all(T0 + 1)

    # The round ended while the slow target's scrape (deadline 1 s, ~20 s of trickle) still ran.
    assert source.in_flight() == 1 and second.errors == {}
    assert _step(store, "healthy") == [(T0, 7.0), (T0 + 1, 7.0)]
    wait_until("the slow scrape's deadline", lambda: source.in_flight() == 0)
    third = source.scrape_all(T0 + 2)
    assert third.errors == {("slow", 0): "timed out after 1 s"}
    assert registry.get(("slow", 0)).last_attempt == T0 + 1  # dated by the round it started in


def test_a_slow_target_that_recovers_is_stored_at_its_rounds_time_and_waited_for_again(stack):
    answered = []

    def slow_once(conn) -> None:
        answered.append(True)
        if len(answered) == 1:
            time.sleep(0.8)  # past the 0.5-s deadline, once
        conn.sendall(response(b"gradwatch_step 5\n"))

    target = HostileTarget(slow_once)
    stack.append(target)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("flaky", 0), target.url)
    source = _source(stack, registry, store, timeout_s=0.5)
    assert source.scrape_all(T0).errors == {("flaky", 0): "timed out after 0.5 s"}

    source.scrape_all(T0 + 1)  # not waited for: recorded at this round's end or the next one's start
    wait_until("the second scrape to end", lambda: source.in_flight() == 0)
    source.scrape_all(T0 + 2)

    assert _step(store, "flaky") == [(T0 + 1, 5.0), (T0 + 2, 5.0)]
    assert registry.get(("flaky", 0)).last_error is None


def test_black_holed_targets_are_waited_on_together_not_in_batches(stack):
    # 64 targets that accept and never answer (the kernel's backlog takes the connections).
    hole = black_hole(backlog=256)
    stack.append(hole)
    registry, store = TargetRegistry(), SampleStore()
    holes = [(f"hole-{i}", 0) for i in range(64)]
    for key in holes:
        _register(registry, key, hole.url)
    _register(registry, HEALTHY, _healthy(stack).url)
    source = _source(stack, registry, store, timeout_s=1.0, max_in_flight=80)

    result = source.scrape_all(T0)

    # Every hole was given the round's one deadline at once: none was left waiting for a
    # worker behind the others (which would say "not scraped"), none got a later deadline.
    assert set(result.errors) == set(holes)
    assert set(result.errors.values()) == {"timed out after 1 s"}
    assert _step(store, "healthy") == [(T0, 7.0)]


def test_a_crowd_of_dead_targets_cannot_starve_a_live_one(stack):
    hole = black_hole()
    stack.append(hole)
    registry, store = TargetRegistry(), SampleStore()
    for i in range(8):
        _register(registry, (f"hole-{i}", 0), hole.url)
    _register(registry, HEALTHY, _healthy(stack).url)  # registered last: queued behind the holes
    source = _source(stack, registry, store, timeout_s=0.5, max_in_flight=4)

    rounds = [source.scrape_all(T0 + t) for t in range(5)]

    # 9 targets, 4 workers: those no worker reached are skipped (not failed) and go first
    # next round, so the live one is tried by the third round; once it answered, it goes
    # before every failing target, and the failing ones have workers of their own.
    assert [r.skipped for r in rounds[:2]] == [5, 1]
    assert all(HEALTHY not in r.errors for r in rounds)
    assert _step(store, "healthy") == [(T0 + 2, 7.0), (T0 + 3, 7.0), (T0 + 4, 7.0)]
    assert source.scrapes_total[HEALTHY] == 3 and HEALTHY not in source.scrape_failures_total


def test_run_and_rank_come_from_the_registration_never_from_the_exposition(stack):
    evil = serving(
        b'gradwatch_loss{run="victim",rank="0"} 50\n'
        b'gradwatch_grad_norm{run="victim",rank="3",layer="fc"} 9\n'
        b"gradwatch_step 12\n"
    )
    stack.append(evil)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("evil", 1), evil.url)
    source = _source(stack, registry, store, timeout_s=1.0)

    assert source.scrape_all(T0).ok == 1

    held = {(name, s.labels) for name in ("gradwatch_loss", "gradwatch_grad_norm", "gradwatch_step") for s in store.select(name)}
    assert held == {
        ("gradwatch_loss", (("rank", "1"), ("run", "evil"))),
        ("gradwatch_grad_norm", (("layer", "fc"), ("rank", "1"), ("run", "evil"))),
        ("gradwatch_step", (("rank", "1"), ("run", "evil"))),
    }
    assert list(store.select("gradwatch_loss", {"run": "victim"})) == []


def test_a_scrape_over_the_sample_limit_fails_and_stores_nothing(stack):
    body = b"".join(b'gradwatch_grad_norm{layer="l%d"} 1\n' % i for i in range(101))
    big = serving(body)
    stack.append(big)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("big", 0), big.url)
    source = _source(stack, registry, store, timeout_s=1.0, limits=TargetLimits(sample_limit=100, series_limit=200))

    result = source.scrape_all(T0)

    assert result.errors == {("big", 0): "sample limit: 101 samples, over target_sample_limit (100)"}
    assert registry.get(("big", 0)).last_error == result.errors[("big", 0)]
    assert store.series_count() == 0


def test_label_churn_stops_at_the_targets_series_limit(stack):
    # 50 series whose labels change every scrape (a step number as a label).
    scrape = itertools.count()

    def churning() -> bytes:
        n = next(scrape)
        return b"".join(b'gradwatch_grad_norm{layer="l%d",step="%d"} 1\n' % (i, n) for i in range(50))

    churner = serving(churning)
    stack.append(churner)
    registry, store = TargetRegistry(), SampleStore()
    _register(registry, ("churn", 0), churner.url)
    _register(registry, HEALTHY, _healthy(stack).url)
    source = _source(stack, registry, store, timeout_s=1.0, limits=TargetLimits(sample_limit=50, series_limit=120))

    errors = [source.scrape_all(T0 + i).errors.get(("churn", 0)) for i in range(6)]
    wait_until("the last scrape to end", lambda: source.in_flight() == 0)
    source.scrape_all(T0 + 6)  # records it (later rounds do not wait for a target over a limit)

    churn = (
        "series limit: 50 new series would make 150, over target_series_limit (120); "
        "labels that change every scrape (label churn) do this"
    )
    assert errors[:3] == [None, None, churn]  # 50, then 100 series held, then refused
    assert registry.get(("churn", 0)).last_error == churn
    assert source.scrape_failures_total[("churn", 0)] >= 2  # refused again (rounds it was still in flight skip it)
    assert store.series_of("churn", "0") == 100  # bounded: the refused scrapes added nothing
    assert len(_step(store, "healthy")) == 7  # the other target is unaffected


def test_the_store_wide_series_limit_refuses_what_would_pass_it(stack):
    registry, store = TargetRegistry(), SampleStore()
    for i in range(3):
        target = serving(b"".join(b'gradwatch_grad_norm{layer="l%d"} 1\n' % j for j in range(40)))
        stack.append(target)
        _register(registry, (f"run-{i}", 0), target.url)
    source = _source(stack, registry, store, timeout_s=1.0, limits=TargetLimits(sample_limit=40, series_limit=40, max_series=100))

    result = source.scrape_all(T0)

    assert result.ok == 2
    assert list(result.errors.values()) == ["series limit: the watchdog holds 80 series, max_series is 100"]
    assert store.series_count() == 80


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n" + PASSWD,  # a 200 that is not an exposition
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 32\r\n\r\n" + PASSWD,
        PASSWD * 4,  # not even HTTP: the HTTP parser's own error would quote it
        b"HTTP/1.1 200 OK\r\n" + PASSWD.replace(b":", b" ") + b"\r\n",  # a header line that is no header
    ],
    ids=["200-not-metrics", "404-with-body", "not-http", "bad-header"],
)
def test_last_error_never_echoes_the_response(stack, tmp_path, answer):
    def handle(conn) -> None:
        conn.sendall(answer)
        conn.close()

    other_service = HostileTarget(handle)
    stack.append(other_service)
    settings = Settings(db=str(tmp_path / "gw.db"), scrape_interval=1.0)
    service = Service(settings, clock=Clock())
    stack.append(service)
    service.register(Registration(run="probe", rank=0, metrics_url=other_service.url))

    service.tick()

    [status] = service.runs()
    assert status.last_error
    for part in ("root", "/bin/bash", "x:0:0", "x 0 0"):
        assert part not in status.last_error, status.last_error
    assert not [e for e in service.audit(run="probe") if "root" in str(e.details)]


def test_registrations_are_capped_and_a_refused_one_stores_nothing(tmp_path, stack):
    settings = Settings(db=str(tmp_path / "gw.db"), max_registrations=2)
    service = Service(settings, clock=Clock())
    stack.append(service)
    for rank in (0, 1):
        service.register(Registration(run="job", rank=rank, metrics_url=f"http://127.0.0.1:9{rank}00/metrics"))

    with pytest.raises(RegistryFull, match=r"already holds 2 registrations \(max_registrations=2\)"):
        service.register(Registration(run="job", rank=2, metrics_url="http://127.0.0.1:9200/metrics"))

    assert [(r.record.run, r.record.rank) for r in service.runs()] == [("job", 0), ("job", 1)]
    # A registered agent may always register again (a restart on a new port).
    service.register(Registration(run="job", rank=1, metrics_url="http://127.0.0.1:9300/metrics"))
    assert service.registry.get(("job", 1)).metrics_url == "http://127.0.0.1:9300/metrics"


def test_a_registration_silent_for_the_expiry_is_removed_and_audited(tmp_path, stack):
    healthy = _healthy(stack)
    dead = black_hole()
    stack.append(dead)
    clock = Clock()
    settings = Settings(db=str(tmp_path / "gw.db"), scrape_timeout=0.5, stale_after=10, registration_expiry=30)
    service = Service(settings, clock=clock)
    stack.append(service)
    service.register(Registration(run="healthy", rank=0, metrics_url=healthy.url))
    service.register(Registration(run="gone", rank=0, metrics_url=dead.url))

    for t in range(0, 45, 5):
        clock.t = T0 + t
        service.tick()

    assert [r.record.run for r in service.runs()] == ["healthy"]
    assert service.registry.get(("gone", 0)) is None
    [expired] = service.audit(kind="run.expired")
    assert (expired.run, expired.time, expired.details) == ("gone", T0 + 30, {"rank": 0, "silent_since": T0})
    assert ("gone", 0) not in service.source.scrapes_total  # nothing kept per target once it is gone
    # Restarting on the same store does not bring it back.
    again = Service(settings, clock=clock)
    stack.append(again)
    assert [t.run for t in again.registry.targets()] == ["healthy"]


def test_a_restart_over_the_cap_watches_what_fits_and_starts(tmp_path, stack):
    db = str(tmp_path / "gw.db")
    first = Service(Settings(db=db), clock=Clock())
    for rank in range(3):
        first.register(Registration(run="job", rank=rank, metrics_url=f"http://127.0.0.1:91{rank}0/metrics"))
    first.close()

    service = Service(Settings(db=db, max_registrations=2), clock=Clock())
    stack.append(service)

    assert len(service.registry.targets()) == 2


def test_limit_settings_are_checked_together():
    with pytest.raises(ValueError, match="registration_expiry"):
        Settings(stale_after=120, registration_expiry=60)
    with pytest.raises(ValueError, match="target_series_limit"):
        Settings(target_sample_limit=1000, target_series_limit=10)


def test_stale_runs_restored_from_the_store_stay_stale_and_flip_in_one_transaction(tmp_path, stack):
    db = str(tmp_path / "gw.db")
    clock = Clock()
    settings = Settings(db=db, stale_after=10, scrape_timeout=0.5)
    first = Service(settings, clock=clock)
    for i in range(30):
        first.register(Registration(run=f"gone-{i}", rank=0, metrics_url=f"http://127.0.0.1:{free_port()}/metrics"))
    commits = []
    first.store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql.upper().startswith("COMMIT") else None)
    clock.t = T0 + 10
    first.tick()  # every run silent 10 s: all go stale in this round
    first.close()

    assert sum(1 for r in first.registry.targets() if r.stale) == 30
    assert len(commits) <= 3  # the flips, the round's progress and alerts: not one per run
    again = Service(settings, clock=clock)
    stack.append(again)
    assert all(t.stale for t in again.registry.targets())  # retried every 30 s, not every round
