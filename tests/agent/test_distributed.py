"""Two real processes on the gloo backend: rank labels, rank-0 detail, and skipping together."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.agent import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def run_two_ranks(tmp_path, use_ddp: bool):
    mp.start_processes(
        dist_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path), use_ddp), nprocs=2, start_method="spawn"
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
