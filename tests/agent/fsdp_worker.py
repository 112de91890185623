"""One rank of the 2-process gloo FSDP2 tests (spawned; must be importable by name).

The MLP's linear layers and the root go through ``fully_shard``. ``mesh="fsdp"``: sharded over both
ranks, so each rank holds half of every 16-row tensor and, of the 1-row head, one rank holds all and
the other an empty shard. ``mesh="hsdp"``: a 2x1 mesh (replicate x shard), every tensor whole on
both ranks (placements Replicate, Shard(0)). Each rank trains on its own batches (generator
100 + rank); FSDP2 averages the gradients.
"""

import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradwatch.agent
from gradwatch.watchdog import metric_names as m
from gradwatch.watchdog.schema import EnableClipping
from tests.agent.models import MLP, loss_of

STEPS = 6
NAN_AT = 2  # loop index whose gradient gets a NaN in one element of rank 1's shard of layers.0.weight
CLIP = 0.05  # global-norm clipping in force on every rank from the start
DETAIL_EVERY = 2
FAIL_AT = 1  # with fail=True: rank 1's measurement raises at this loop index

PER_LAYER = {
    "grad_norm": m.GRAD_NORM,
    "grad_abs_mean": m.GRAD_ABS_MEAN,
    "grad_abs_max": m.GRAD_ABS_MAX,
    "grad_abs_min": m.GRAD_ABS_MIN,
    "param_norm": m.PARAM_NORM,
    "update_ratio": m.UPDATE_RATIO,
}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def build_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


SCENARIOS = (("fsdp", False), ("hsdp", True))
"""(mesh, fail) pairs, run one after the other by the same two processes (a spawn costs more than a run)."""


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the MLP returns a view (squeeze)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mesh, fail in SCENARIOS:
            result = train(rank, world, mesh, fail)
            torch.save(result, os.path.join(out_dir, f"{mesh}-rank{rank}.pt"))
        torch.save(watch_different_parameters(rank, world), os.path.join(out_dir, f"mismatch-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train(rank: int, world: int, mesh: str, fail: bool) -> dict:
    records = _Records()
    logger = logging.getLogger("gradwatch.agent")
    logger.addHandler(records)
    model = build_model()
    if mesh == "fsdp":
        device_mesh = init_device_mesh("cpu", (world,))
    else:
        device_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
    for layer in model.layers:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradwatch.agent.watch(model, opt, run="fsdp", port=0, every=1, detail_every=DETAIL_EVERY)
    agent.remedy.apply(EnableClipping(mode="global_norm", threshold=CLIP))  # as a command would, on every rank
    if fail and rank == 1:
        measure = agent.monitor.shards.measure

        def failing(step, *args, **kwargs):
            if step == FAIL_AT + 1:
                raise RuntimeError("injected measurement failure")
            return measure(step, *args, **kwargs)

        agent.monitor.shards.measure = failing
    gen = torch.Generator().manual_seed(100 + rank)
    labels = {"run": "fsdp", "rank": str(rank)}
    global_norms = []
    for i in range(STEPS):
        opt.zero_grad()
        loss_of(model, model.example(gen)).backward()
        if i == NAN_AT and rank == 1:
            model.layers[0].weight.grad.to_local()[0, 0] = float("nan")
        opt.step()
        global_norms.append(agent.registry.get_sample_value(m.GRAD_GLOBAL_NORM, labels))
    families = {f.name: f for f in agent.registry.collect()}
    per_layer = {
        key: {s.labels["layer"]: s.value for s in families[name].samples}
        for key, name in PER_LAYER.items()
        if name in families
    }
    result = {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],  # a collective: every rank
        "names": [n for n, _ in model.named_parameters()],
        "placements": {tuple(repr(p) for p in param.placements) for param in model.parameters()},
        "global_norms": global_norms,
        "per_layer": per_layer,
        "step": agent.registry.get_sample_value(m.STEP, labels),
        "skipped": {
            s.labels["reason"]: s.value
            for s in families[m.SKIPPED_STEPS_TOTAL.removesuffix("_total")].samples
            if s.value
        },
        "nonfinite": {
            (s.labels["layer"], s.labels["kind"]): s.value
            for s in families[m.NONFINITE_GRADS_TOTAL.removesuffix("_total")].samples
            if s.value
        },
        "logged": [(r.levelname, r.getMessage(), r.exc_info is not None) for r in records.records],
    }
    agent.close()
    logger.removeHandler(records)
    return result


def watch_different_parameters(rank: int, world: int) -> str:
    """Rank 1's optimizer holds only the hidden layers (as a pipeline stage would hold its own part):
    watch() must refuse on every rank rather than let the per-step reductions mismatch."""
    model = build_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.layers:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters() if rank == 0 else model.layers.parameters(), lr=1e-2)
    try:
        gradwatch.agent.watch(model, opt, run="fsdp", port=0)
    except ValueError as exc:
        return str(exc)
    return "watch() accepted"
