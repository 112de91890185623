"""What one snapshot costs: host bytes, the time to take it and to restore it, against a training step.

    python benchmarks/snapshot_cost.py [--sizes 1,10,50] [--rounds 5] [--device cpu|cuda]

For each model (an MLP of about N million parameters under AdamW, whose state is two
more copies of the parameters) it measures, in one run: a plain training step, taking
a snapshot into a full ring (buffers reused, as in a long run), and restoring one. The
ratio column is a snapshot's time over a step's: with ``snapshots={"every": K}`` the
cost per step is that ratio / K (e.g. 3 steps' worth every 100 steps = 3 %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, header_lines
from gradwatch.agent.rollback import agent_state
from gradwatch.agent.snapshots import SnapshotConfig, SnapshotRing


def model_of(millions: float, device: str) -> nn.Module:
    width = int((millions * 1e6 / 4) ** 0.5)  # four width x width layers
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.GELU())]).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(millions: float, device: str, rounds: int, batch: int) -> list[str]:
    torch.manual_seed(0)
    model = model_of(millions, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    width = model[0].in_features
    x = torch.randn(batch, width, device=device)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()  # the optimizer's state exists from here on

    monitor = SimpleNamespace(step=0, spikes=None)  # the agent's own part of a snapshot, as it is at attach
    remedy = SimpleNamespace(history={})
    ring = SnapshotRing(SnapshotConfig(every=1, keep=2, max_bytes=2**62), model, opt,
                        lambda: agent_state(monitor, remedy), lambda state: None)
    ring.take(0)
    ring.take(1)  # the ring is full: from here on every snapshot reuses the oldest one's buffers
    step_s = timed(step, device, rounds)
    take_s = timed(lambda: ring.take(2), device, rounds)
    restore_s = timed(lambda: ring.restore(ring.ring[-1]), device, rounds)
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = ring.ring[-1].nbytes
    return [f"{n_params / 1e6:.2f} M", f"{nbytes / 2**20:.0f} MiB", f"{step_s * 1e3:.1f}", f"{take_s * 1e3:.1f}",
            f"{take_s / step_s:.2f}", f"{restore_s * 1e3:.1f}", f"{nbytes / take_s / 2**30:.1f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,50", help="model sizes in millions of parameters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("\n".join(header_lines({"torch": torch.__version__, "device": args.device, "threads": "1",
                                  "model": "4-layer MLP, AdamW (state = 2 copies of the parameters)"})))
    rows = [measure(float(m), args.device, args.rounds, args.batch) for m in args.sizes.split(",")]
    headers = ["parameters", "snapshot bytes", "step ms", "snapshot ms", "snapshot / step", "restore ms", "GiB/s"]
    print(format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
