"""One rank of the 2-process gloo rollback test (spawned; must be importable by name)."""

import os
import time
from pathlib import Path

import gradwatch.agent
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.agent.models import MLP, loss_of

READY_AT = 12  # rank 0 writes `ready` after this step; the test then sends the rollback


def run(rank: int, world: int, init_file: str, out_dir: str, watchdog_url: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MLP()
        net = DistributedDataParallel(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        agent = gradwatch.agent.watch(model, opt, run="dist", port=0, watchdog_url=watchdog_url,
                                      poll_interval_s=0.02, snapshots={"every": 5, "keep": 2})
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as under DDP
        saved, rolled = {}, None
        for i in range(400):
            opt.zero_grad()
            loss_of(net, model.example(gen)).backward()
            before = agent.step
            opt.step()
            if agent.step <= before and rolled is None:
                rolled = {"attempt": i, "restored": agent.step, "params": [p.detach().clone() for p in model.parameters()]}
            elif rolled is None and agent.step % 5 == 0:
                saved[agent.step] = [p.detach().clone() for p in model.parameters()]
            if rank == 0 and agent.step == READY_AT and rolled is None:
                Path(out_dir, "ready").touch()
            if rolled is not None and i >= rolled["attempt"] + 5:
                break
            time.sleep(0.02)
        result = {"rolled": rolled, "saved": saved, "params": [p.detach().clone() for p in model.parameters()],
                  "step": agent.step}
        agent.close()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
