"""A rollback under DDP on two gloo processes: every rank goes back to the same step, in step."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.agent import dist_rollback_worker
from tests.agent.fake_watchdog import FakeWatchdog

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def test_ddp_ranks_roll_back_at_the_same_step_to_identical_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", "dist-secret")  # inherited by the spawned ranks
    watchdog = FakeWatchdog(b"dist-secret")
    try:
        context = mp.start_processes(
            dist_rollback_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path), watchdog.url),
            nprocs=2, start_method="spawn", join=False,
        )
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "the ranks never reached the ready step"
            assert not context.join(timeout=0.05), "the ranks ended before the rollback was sent"
        watchdog.send("dist", {"action": "rollback", "before_step": dist_rollback_worker.READY_AT})
        while not context.join(timeout=1):
            assert time.monotonic() < deadline
    finally:
        watchdog.close()
    r0, r1 = (torch.load(Path(tmp_path) / f"rank{r}.pt") for r in range(2))
    assert r0["rolled"] is not None and r1["rolled"] is not None
    assert r0["rolled"]["attempt"] == r1["rolled"]["attempt"]  # the same step on both ranks
    assert r0["rolled"]["restored"] == r1["rolled"]["restored"] == 10
    for saved, a, b in zip(r0["saved"][10], r0["rolled"]["params"], r1["rolled"]["params"]):
        assert torch.equal(a, saved) and torch.equal(b, saved)  # both back at step 10's state exactly
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # and still in lockstep afterwards
    (ack,) = watchdog.acks
    assert ack.rank == 0 and ack.status == "applied" and ack.restored_step == 10
