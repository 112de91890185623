"""TargetRegistry: registration, re-registration after an agent restart, staleness, change callbacks."""

from __future__ import annotations

import pytest

from gradwatch.watchdog.schema import Registration
from gradwatch.watchdog.sources.targets import Target, TargetRegistry


def _registration(run: str = "llama-7b", rank: int = 0, port: int = 9100, **extra) -> Registration:
    return Registration(run=run, rank=rank, metrics_url=f"http://127.0.0.1:{port}/metrics", **extra)


@pytest.fixture
def changes() -> list[Target]:
    return []


@pytest.fixture
def registry(changes) -> TargetRegistry:
    return TargetRegistry(stale_after_s=30.0, on_change=changes.extend)


def test_register_adds_target_keyed_by_run_and_rank(registry, changes):
    registry.register(_registration(rank=0, world_size=2), now=100.0)
    registry.register(_registration(rank=1, port=9101, world_size=2), now=100.0)

    targets = registry.targets()
    assert [t.key for t in targets] == [("llama-7b", 0), ("llama-7b", 1)]
    assert targets[1].metrics_url == "http://127.0.0.1:9101/metrics"
    assert targets[1].world_size == 2
    assert not targets[1].stale
    assert [t.key for t in changes] == [("llama-7b", 0), ("llama-7b", 1)]


def test_target_goes_stale_after_stale_after_without_an_answer(registry, changes):
    registry.register(_registration(), now=100.0)
    key = ("llama-7b", 0)

    registry.mark_scraped(key, 110.0, ok=True)
    registry.mark_scraped(key, 130.0, ok=False, error="connection refused")
    assert not registry.get(key).stale  # silent for 20 s < 30 s
    registry.mark_scraped(key, 140.0, ok=False, error="connection refused")

    target = registry.get(key)
    assert target.stale  # silent since 110: 30 s
    assert target.last_error == "connection refused"
    assert target.last_success == 110.0
    assert target.last_attempt == 140.0
    assert target in registry.targets()  # marked, never deleted


def test_never_answering_target_goes_stale_counting_from_registration(registry):
    registry.register(_registration(), now=100.0)
    key = ("llama-7b", 0)
    registry.mark_scraped(key, 129.0, ok=False, error="timed out")
    assert not registry.get(key).stale
    registry.mark_scraped(key, 130.0, ok=False, error="timed out")
    assert registry.get(key).stale


def test_on_change_fires_when_staleness_flips_not_on_every_scrape(registry, changes):
    registry.register(_registration(), now=100.0)
    key = ("llama-7b", 0)
    for now in (105.0, 110.0, 115.0):
        registry.mark_scraped(key, now, ok=True)
    for now in (140.0, 145.0, 150.0):
        registry.mark_scraped(key, now, ok=False, error="refused")
    registry.mark_scraped(key, 155.0, ok=True)

    assert [t.stale for t in changes] == [False, True, False]
    assert changes[1].last_attempt == 145.0  # the scrape that made it stale (silent since 115)


def test_reregistration_replaces_url_and_clears_stale(registry, changes):
    registry.register(_registration(port=9100), now=100.0)
    key = ("llama-7b", 0)
    registry.mark_scraped(key, 140.0, ok=False, error="refused")
    assert registry.get(key).stale

    registry.register(_registration(port=9200, step=5000), now=150.0)

    [target] = registry.targets()
    assert target.metrics_url == "http://127.0.0.1:9200/metrics"
    assert not target.stale
    assert target.registered_at == 150.0
    assert target.step_at_registration == 5000
    assert changes[-1] == target
    # The staleness clock restarts at the re-registration.
    registry.mark_scraped(key, 170.0, ok=False, error="refused")
    assert not registry.get(key).stale


def test_result_for_the_url_before_a_reregistration_is_ignored(registry):
    registry.register(_registration(port=9100), now=100.0)
    registry.register(_registration(port=9200), now=150.0)

    old_url = "http://127.0.0.1:9100/metrics"
    result = registry.mark_scraped(("llama-7b", 0), 200.0, ok=False, error="refused", url=old_url)

    assert result is None
    assert registry.get(("llama-7b", 0)).last_attempt is None


def test_mark_scraped_for_unknown_target_is_ignored(registry):
    assert registry.mark_scraped(("nobody", 3), 100.0, ok=True) is None
    assert registry.targets() == []


def test_failing_on_change_does_not_break_registration():
    def broken_store(targets: list[Target]) -> None:
        raise RuntimeError("database is locked")

    registry = TargetRegistry(on_change=broken_store)
    registry.register(_registration(), now=100.0)
    assert len(registry.targets()) == 1


def test_stale_after_must_be_positive():
    with pytest.raises(ValueError, match="stale_after_s"):
        TargetRegistry(stale_after_s=0)
