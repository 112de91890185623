"""One rank of the 2-process gloo tests (spawned; must be importable by name)."""

import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradwatch.agent
from gradwatch.watchdog import metric_names as m
from tests.agent.models import MLP, loss_of


def run(rank: int, world: int, init_file: str, out_dir: str, use_ddp: bool, watchdog_url: str | None = None) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MLP()
        net = DistributedDataParallel(model) if use_ddp else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        agent = gradwatch.agent.watch(
            model, opt, run="dist", port=0, every=1, detail_every=1, watchdog_url=watchdog_url, poll_interval_s=0.02
        )
        gen = torch.Generator().manual_seed(100 + rank if use_ddp else 100)
        steps = 60 if watchdog_url else 6
        scaled_at = None
        for i in range(steps):
            opt.zero_grad()
            inputs = model.example(gen)
            if i == 3 and rank == 1 and use_ddp:  # a NaN batch on one rank: DDP's all-reduce spreads it
                inputs[0][0] = float("nan")
            loss_of(net, inputs).backward()
            if i == 3 and rank == 1 and not use_ddp:  # a NaN gradient on one rank only
                model.head.weight.grad[0, 0] = float("nan")
            opt.step()
            if scaled_at is None and agent.remedy.lr_scale != 1.0:
                scaled_at = agent.step
            if watchdog_url:
                time.sleep(0.02)  # give rank 0's poller time to bring the command in mid-run
        families = {f.name: f for f in agent.registry.collect()}
        result = {
            "params": [p.detach().clone() for p in model.parameters()],
            "rank_labels": {s.labels["rank"] for f in families.values() for s in f.samples},
            "per_layer": len(families[m.GRAD_NORM].samples),
            "skipped": {
                s.labels["reason"]: s.value
                for s in families[m.SKIPPED_STEPS_TOTAL.removesuffix("_total")].samples
                if s.value  # reasons are exported at 0 from the start
            },
            "step": families[m.STEP].samples[0].value,
            "scaled_at": scaled_at,
        }
        agent.close()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
