"""Two real processes on the gloo backend: rank labels, rank-0 detail, and skipping together."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.agent import dist_worker
from tests.agent.fake_watchdog import FakeWatchdog

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def run_two_ranks(tmp_path, use_ddp: bool, watchdog_url: str | None = None):
    mp.start_processes(
        dist_worker.run,
        args=(2, str(tmp_path / "init"), str(tmp_path), use_ddp, watchdog_url),
        nprocs=2,
        start_method="spawn",
    )
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("use_ddp", [True, False], ids=["ddp", "no-gradient-sync"])
def test_nan_on_one_rank_makes_every_rank_skip(tmp_path, use_ddp):
    r0, r1 = run_two_ranks(tmp_path, use_ddp)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)  # ranks stayed in lockstep
    assert r0["step"] == r1["step"] == 6
    assert r0["rank_labels"] == {"0"} and r1["rank_labels"] == {"1"}
    assert r0["per_layer"] > 0 and r1["per_layer"] == 0  # per-layer detail on rank 0 only
    assert r1["skipped"] == {"nonfinite": 1}
    # With DDP the all-reduce already spread the NaN; without it, the guard's own all-reduce tells rank 0.
    assert r0["skipped"] == ({"nonfinite": 1} if use_ddp else {"nonfinite_peer": 1})


def test_command_takes_effect_at_the_same_step_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", "dist-secret")  # inherited by the spawned ranks
    watchdog = FakeWatchdog(b"dist-secret")
    try:
        watchdog.send("dist", {"action": "lower_lr", "factor": 0.5})
        watchdog.send("dist", {"action": "enable_clipping", "mode": "clip_l2_per_layer", "threshold": 0.01})
        r0, r1 = run_two_ranks(tmp_path, use_ddp=True, watchdog_url=watchdog.url)
    finally:
        watchdog.close()
    assert r0["scaled_at"] is not None and r0["scaled_at"] == r1["scaled_at"]
    assert [a.step for a in watchdog.acks] == [r0["scaled_at"]] * 2 and {a.rank for a in watchdog.acks} == {0}
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert len(watchdog.registrations) == 2  # every rank registers its metrics endpoint; rank 0 polls
