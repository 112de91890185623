"""FSDP2 (``fully_shard``) on two real gloo processes: the exported values are those of the whole,
unsharded gradient, every rank skips a step whose gradient holds a NaN on one rank's shard, and
global-norm clipping acts on the shards with the global total."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.agent import fsdp_worker as w
from tests.agent.models import loss_of

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both scenarios of the worker, run by one spawn of two processes: mesh -> (rank 0's, rank 1's results)."""
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(w.run, args=(2, str(out / "init"), str(out)), nprocs=2, start_method="spawn")
    names = [mesh for mesh, _ in w.SCENARIOS] + ["mismatch"]
    return {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(2)] for name in names}


def reference(unclipped: tuple[int, ...] = ()):
    """The same model and batches on one process, unsharded: each step's gradient is the mean of the
    two ranks' batch gradients (what FSDP2 reduces), the NaN step's batches are dropped, and the
    gradient is clipped to the global norm ``CLIP`` by hand (except at the loop indices ``unclipped``)."""
    model = w.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    global_norms, layers, ratios = [], {}, {}
    for i in range(w.STEPS):
        batches = [model.example(g) for g in gens]
        opt.zero_grad()
        (sum(loss_of(model, b) for b in batches) / 2).backward()
        if i == w.NAN_AT:  # skipped on every rank: as if these batches were dropped
            global_norms.append(None)
            continue
        named = list(model.named_parameters())
        total = math.sqrt(sum(float(p.grad.double().square().sum()) for _, p in named))
        global_norms.append(total)
        layers = {
            n: {
                "grad_norm": float(p.grad.norm()),
                "grad_abs_mean": float(p.grad.abs().mean()),
                "grad_abs_max": float(p.grad.abs().max()),
                "grad_abs_min": float(p.grad.abs().min()),
                "param_norm": float(p.detach().norm()),
            }
            for n, p in named
        }
        coef = 1.0 if i in unclipped else w.CLIP / max(total, w.CLIP)
        before = {n: p.detach().clone() for n, p in named}
        for _, p in named:
            p.grad.mul_(coef)
        opt.step()
        ratios[i + 1] = {n: float((p.detach() - before[n]).abs().sum() / before[n].abs().sum()) for n, p in named}
    return global_norms, layers, ratios, [p.detach() for p in model.parameters()]


def test_exported_values_are_the_unsharded_gradients_and_every_rank_skips_together(runs):
    r0, r1 = runs["fsdp"]
    global_norms, layers, ratios, weights = reference()
    assert r0["placements"] == {("Shard(dim=0)",)}
    assert max(n for n in global_norms if n is not None) > w.CLIP  # the clipping had work to do

    # Every rank exports the whole gradient's global norm (not its shard's), before clipping.
    for r in (r0, r1):
        for i, expected in enumerate(global_norms):
            if expected is not None:  # a skipped step leaves the last measured value
                assert r["global_norms"][i] == pytest.approx(expected, rel=1e-5), i
    # Per-layer detail on rank 0 only, under the plain model's parameter names; the last step
    # (a detail step) against the unsharded gradient, and the update ratio of the last detail step
    # whose ratio was exported (step 4; step 6's rides with a next step).
    assert not any(r1["per_layer"].values())
    assert set(r0["per_layer"]["grad_norm"]) == set(layers) == set(r0["names"])
    for key in ("grad_norm", "grad_abs_mean", "grad_abs_max", "grad_abs_min", "param_norm"):
        for layer, values in layers.items():
            assert r0["per_layer"][key][layer] == pytest.approx(values[key], rel=1e-5, abs=1e-9), (key, layer)
    for layer, ratio in ratios[4].items():
        assert r0["per_layer"]["update_ratio"][layer] == pytest.approx(ratio, rel=1e-4), layer

    # The NaN was in rank 1's shard only; rank 0 skipped because of it (the combined count told it).
    assert r1["skipped"] == {"nonfinite": 1} and r1["nonfinite"] == {("layers.0.weight", "nan"): 1}
    assert r0["skipped"] == {"nonfinite_peer": 1} and r0["nonfinite"] == {}
    assert r0["step"] == r1["step"] == w.STEPS
    # Weights: finite, the same on both ranks, and those of the run without the NaN step's batches,
    # with the clipping applied on the shards equal to clipping the whole gradient.
    for a, b, ref in zip(r0["params"], r1["params"], weights):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    for r in (r0, r1):
        assert [entry for entry in r["logged"] if entry[0] in ("ERROR", "CRITICAL") or entry[2]] == []


def test_replicated_shards_count_once_and_a_failure_on_one_rank_keeps_the_replicas_identical(runs):
    """HSDP (every tensor replicated on both ranks): sums divided by the replication factor. Rank 1's
    measurement raises at one step: it joins that step's reductions as failed, so every rank leaves
    that step unmeasured and unclipped (the replicas stay identical), nobody hangs, and the NaN
    step later is still skipped by both."""
    r0, r1 = runs["hsdp"]
    global_norms, layers, _, weights = reference(unclipped=(w.FAIL_AT,))
    assert r0["placements"] == {("Replicate()", "Shard(dim=0)")}
    for r in (r0, r1):
        for i, expected in enumerate(global_norms):
            if i == w.FAIL_AT:  # unmeasured: the previous step's value stays
                assert r["global_norms"][i] == r["global_norms"][i - 1]
            elif expected is not None:
                assert r["global_norms"][i] == pytest.approx(expected, rel=1e-5), i
    for layer, values in layers.items():
        assert r0["per_layer"]["grad_norm"][layer] == pytest.approx(values["grad_norm"], rel=1e-5), layer
    assert r0["step"] == r1["step"] == w.STEPS
    assert r1["skipped"] == {"nonfinite": 1} and r0["skipped"] == {"nonfinite_peer": 1}
    for a, b, ref in zip(r0["params"], r1["params"], weights):
        assert torch.equal(a, b)  # two replicas, each updated by its own rank
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    failures = [entry for entry in r1["logged"] if entry[2]]
    assert len(failures) == 1 and "monitoring failed" in failures[0][1]
    assert [entry for entry in r0["logged"] if entry[0] == "ERROR" or entry[2]] == []
    assert any("could not measure their shards" in entry[1] for entry in r0["logged"])


def test_ranks_watching_different_parameters_are_refused_on_every_rank(runs):
    for message in runs["mismatch"]:
        assert "ranks watch different parameters" in message
