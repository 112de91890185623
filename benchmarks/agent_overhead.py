"""What gradwatch's agent costs per training step, next to the alternatives.

    python benchmarks/agent_overhead.py [--quick] [--steps N] [--device cpu|cuda] [--profile]

Four reference models train with Adam on seeded synthetic data, plus two stress models
(the MLP and the 406-tensor model at batch 64: light steps, measured and shown but outside
the issue's goals, which assume one read of every gradient costs 0.1-1.6 % of a step).
Every variant (no monitoring, a second copy of it as an A/A control, the agent at its
default sampling, the agent with statistics on every step (``every=1``: the update ratio
and min |g| stay at their coarser period), the agent with those on every step too, the
guard alone, the floor of any per-step guard (one L2 pass over the gradients and one host
read), clip_grad_norm_, a naive per-parameter ``.item()`` loop, Lightning's grad_norm,
wandb.watch) has its own copy of the model, optimizer and batches, so only the monitoring
differs, and no hook of one variant can reach another's model.

Variants run interleaved in one process: each round runs one block of every
variant, in a shuffled order, after a few warm-up steps. ``agent (default)`` and
``agent (every=1)`` run 50-step blocks, one period of the default statistics
sampling (every 50th step), ``none`` 20, most others 10, the slow
``wandb.watch(log_freq=1)`` 2. A block's mean step time thus amortises the agent's
sampled step exactly (a median over single steps would hide it). The update ratio and
min |g|, measured every 250th step, fall in one block of five, which the median over
rounds leaves out: timed alone, their extra cost is about 3 ms once per 250 steps on
the MLP, 0.1 % of a step (250-step blocks would include it at the price of half the
rounds, and wider intervals). ``ms/step`` is the median over rounds of a variant's block means;
``ratio`` is the median over rounds of (variant block mean / ``none`` block mean of the
same round), with a 95 % bootstrap interval: pairing within a round cancels drift in
the machine's load. The A/A row measures ``none`` against an identical copy: how far a
ratio strays when nothing differs. On CPU the clock is the process's CPU time unless
``--clock wall``: on a shared machine wall time mostly measures the other tenants.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import logging
import math
import os
import pstats
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from common import command_line, format_table, header_lines, mark

NEVER = 10**12  # `every` of the guard-only agent: statistics are never sampled
GOALS = {"default": 1.02, "every": 1.10, "naive_vs_guard": 5.0}
MANY_TENSORS = 3  # index of the ~400-tensor model in WORKLOADS


# -- reference models ------------------------------------------------------------------


@dataclass
class Workload:
    """A model family: how to build one model, its batches and its loss."""

    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], list[tuple[torch.Tensor, torch.Tensor]]]
    loss: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    seconds: float  # time budget of a full run (the slow models get a little more)
    goals: bool = True  # False: a stress model, measured and shown but outside the goals


def _classify(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _lm(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab: int = 1000, embed: int = 128, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


class TransformerLanguageModel(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 128, heads: int = 4, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos[: tokens.shape[1]]))


class PreNormBlock(nn.Module):
    """x + GELU(Linear(LayerNorm(x))): four parameter tensors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.gelu(self.linear(self.norm(x)))


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _many_tensors() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), *[PreNormBlock(64) for _ in range(100)], nn.LayerNorm(64), nn.Linear(64, 10))


def _features(n_in: int, batch: int, classes: int):
    return lambda g: [(torch.randn(batch, n_in, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(8)]


def _tokens(vocab: int, batch: int, seq: int):
    def make(g):
        out = []
        for _ in range(8):
            t = torch.randint(0, vocab, (batch, seq + 1), generator=g)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out

    return make


WORKLOADS = [
    # The judged models are sized so that one read of their gradients (the floor row) costs
    # what the goals assume, 0.1-1.6 % of a step: the LSTM and the transformer take
    # 1,024 tokens a step, the MLP a batch of 512 and the 406-tensor model a batch of 1,024.
    Workload("mlp 24x Linear(256,256) b512", _mlp, _features(256, 512, 10), _classify, 140),
    Workload("lstm 2x256 seq32 b32", LSTMLanguageModel, _tokens(1000, 32, 32), _lm, 100),
    Workload("transformer 4x d128 seq64 b16", TransformerLanguageModel, _tokens(1000, 16, 64), _lm, 100),
    Workload("prenorm 100 blocks (~400 tensors) b1024", _many_tensors, _features(32, 1024, 10), _classify, 150),
    # The same two at batch 64: steps light enough that one read of the gradients costs 4-5 % of
    # a step (the MLP: 6.3 MB against a 13-ms step; the 406-tensor model: 406 reads of small
    # tensors, dispatch-bound, against a 19-ms step). Shown so the every-step guard's cost on
    # light steps is on record; no per-step guard can be under 1.02x there.
    Workload("stress: mlp 24x Linear(256,256) b64", _mlp, _features(256, 64, 10), _classify, 70, goals=False),
    Workload("stress: prenorm 100 blocks b64", _many_tensors, _features(32, 64, 10), _classify, 90, goals=False),
]


# -- monitoring variants -------------------------------------------------------------------


class Hooks:
    """What a variant adds to the plain loop: ``pre_step`` between backward and
    ``optimizer.step()``, ``post_step`` after it, ``close`` when the benchmark ends."""

    def pre_step(self, loss: torch.Tensor) -> None:
        pass

    def post_step(self, loss: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class AgentHooks(Hooks):
    _made = 0

    def __init__(self, model, optimizer, **settings) -> None:
        import gradwatch.agent

        # The variants' agents live side by side: one run name each (one process refuses two agents of one run and rank).
        AgentHooks._made += 1
        self.agent = gradwatch.agent.watch(model, optimizer, run=f"bench-{AgentHooks._made}", port=0, **settings)

    def pre_step(self, loss):
        self.agent.observe(loss=loss)  # as in the quickstart: the loss rides this step's transfer

    def close(self):
        self.agent.close()


class ClipHooks(Hooks):
    def __init__(self, model, optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def pre_step(self, loss):
        torch.nn.utils.clip_grad_norm_(self.params, 1e9, foreach=True)


class FloorHooks(Hooks):
    """The least any per-step guard of the global norm does: one multi-tensor L2 pass over the
    gradients and one host read of their global norm."""

    def __init__(self, model, optimizer) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def pre_step(self, loss):
        norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None], 2.0)
        self.latest = torch.linalg.vector_norm(torch.stack(norms)).item()


class NaiveHooks(Hooks):
    """The loop users write first: the agent's five statistics, one ``.item()`` each, every step."""

    def __init__(self, model, optimizer) -> None:
        self.named = list(model.named_parameters())
        self.latest: dict[str, tuple[float, ...]] = {}

    @torch.no_grad()
    def pre_step(self, loss):
        for name, p in self.named:
            g = p.grad
            if g is None:
                continue
            a = g.abs()
            self.latest[name] = (g.norm(2).item(), a.mean().item(), a.max().item(), a.min().item(), p.norm(2).item())


class LightningHooks(Hooks):
    """``lightning.pytorch.utilities.grad_norm`` as in ``on_before_optimizer_step``; the norms are
    computed, not logged (``self.log_dict`` needs a Trainer)."""

    def __init__(self, model, optimizer) -> None:
        from lightning.pytorch.utilities import grad_norm

        self.model, self.grad_norm = model, grad_norm

    def pre_step(self, loss):
        self.latest = self.grad_norm(self.model, norm_type=2)


class WandbHooks(Hooks):
    """``wandb.watch(model, log="all")`` in an offline run, with ``wandb.log`` of the loss every
    step: watch's histograms are written with the next ``wandb.log``, so a loop that never logs
    would measure nothing."""

    def __init__(self, model, log_freq: int | None) -> None:
        import wandb

        self.wandb, self.model = wandb, model
        kwargs = {} if log_freq is None else {"log_freq": log_freq}
        wandb.watch(model, log="all", **kwargs)

    def post_step(self, loss):
        self.wandb.log({"loss": float(loss.detach())})

    def close(self):
        self.wandb.unwatch(self.model)


@dataclass
class Variant:
    name: str
    key: str
    make: Callable[[nn.Module, torch.optim.Optimizer], Hooks]
    block: int = 10  # steps per round
    unavailable: str | None = None  # why it cannot run here (printed as n/a)


def _try_import(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except Exception as exc:  # a missing package or a broken install: report it, don't die
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:70]


def build_variants(with_wandb: bool) -> list[Variant]:
    no_lightning = _try_import("lightning.pytorch.utilities")
    no_wandb = "skipped (--no-wandb)" if not with_wandb else _try_import("wandb")
    return [
        Variant("none", "none", lambda m, o: Hooks(), block=20),
        Variant("none, second copy (A/A)", "aa", lambda m, o: Hooks()),
        Variant("agent (default)", "default", lambda m, o: AgentHooks(m, o), block=50),
        Variant("agent (every=1)", "every", lambda m, o: AgentHooks(m, o, every=1), block=50),
        Variant("agent (every=1, detail_every=1)", "all", lambda m, o: AgentHooks(m, o, every=1, detail_every=1)),
        Variant("guard only", "guard", lambda m, o: AgentHooks(m, o, every=NEVER, detail_every=NEVER, guard=True)),
        Variant("floor: one L2 pass + .item()", "floor", FloorHooks),
        Variant("clip_grad_norm_(foreach)", "clip", ClipHooks),
        Variant("naive .item() loop", "naive", NaiveHooks),
        Variant("lightning grad_norm", "lightning", LightningHooks, unavailable=no_lightning),
        Variant("wandb.watch(all, log_freq=1)", "wandb1", lambda m, o: WandbHooks(m, 1), block=2, unavailable=no_wandb),
        Variant("wandb.watch(all, default freq)", "wandb", lambda m, o: WandbHooks(m, None), unavailable=no_wandb),
    ]


# -- measurement ------------------------------------------------------------------------


@dataclass
class Runner:
    """One variant's own model, optimizer, batches and hooks."""

    variant: Variant
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list
    hooks: Hooks
    loss_fn: Callable
    times: list[list[float]] = field(default_factory=list)  # per measured round: seconds of each step
    steps: int = 0

    def run(self, steps: int, clock: Callable[[], float], sync: Callable[[], None], per_step_timing: bool) -> list[float]:
        """Train ``steps`` steps; return each step's seconds, or one entry (the block's
        mean) when only the block is timed (cuda with --cuda-sync block)."""
        model, opt, hooks, loss_fn, batches = self.model, self.optimizer, self.hooks, self.loss_fn, self.batches
        out = []
        sync()
        start = last = clock()
        for _ in range(steps):
            batch = batches[self.steps % len(batches)]
            self.steps += 1
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            hooks.pre_step(loss)
            opt.step()
            hooks.post_step(loss)
            if per_step_timing:
                sync()
                now = clock()
                out.append(now - last)
                last = now
        if not per_step_timing:
            sync()
            out.append((clock() - start) / steps)
        return out


def ratio_ci(times: torch.Tensor, base: torch.Tensor, resamples: int = 2000) -> tuple[float, float, float]:
    """Median over rounds of ``times[i] / base[i]`` (per-step means of round i, run side by side)
    and a 95 % bootstrap interval for it."""
    ratios = (times / base).double()
    ratio = float(ratios.quantile(0.5))
    n = ratios.numel()
    if n < 3:
        return ratio, math.nan, math.nan
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(0))
    lo, hi = torch.quantile(ratios[idx].quantile(0.5, dim=1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return ratio, lo, hi


def _wandb_init(tmp: str):
    import wandb

    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    kwargs = dict(mode="offline", dir=tmp, project="gradwatch-bench")
    try:  # no console capture, no system-metrics sampler competing for the CPU
        return wandb.init(**kwargs, settings=wandb.Settings(console="off", x_disable_stats=True))
    except Exception:  # a wandb without that private setting
        return wandb.init(**kwargs, settings=wandb.Settings(console="off"))


def measure(workload: Workload, variants: list[Variant], device: torch.device, args) -> dict[str, Runner]:
    """Interleave every available variant on ``workload``; mark the ones that cannot run."""
    torch.manual_seed(0)
    reference = workload.build().to(device)
    batches = [tuple(t.to(device) for t in b) for b in workload.batches(torch.Generator().manual_seed(1))]
    tmp = tempfile.TemporaryDirectory(prefix="gradwatch-bench-")
    wandb_run = None
    runners: dict[str, Runner] = {}
    try:
        if any(v.key.startswith("wandb") and v.unavailable is None for v in variants):
            try:
                wandb_run = _wandb_init(tmp.name)
            except Exception as exc:
                for v in variants:
                    if v.key.startswith("wandb") and v.unavailable is None:
                        v.unavailable = f"wandb.init failed: {type(exc).__name__}: {exc}"[:70]
        for v in variants:
            if v.unavailable is not None:
                continue
            model = copy.deepcopy(reference)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            try:
                hooks = v.make(model, opt)
            except Exception as exc:
                v.unavailable = f"{type(exc).__name__}: {exc}"[:70]
                continue
            runners[v.key] = Runner(v, model, opt, batches, hooks, workload.loss)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        per_step_timing = device.type != "cuda" or args.cuda_sync == "step"
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        order = list(runners.values())
        for r in order:  # warm-up: Adam state, allocator, the agents' first transfer, wandb's first rows
            r.run(args.warmup_steps, clock, sync, per_step_timing)
        rng = random.Random(2)
        deadline = time.monotonic() + workload.seconds
        rounds = 0
        while True:
            rng.shuffle(order)
            for r in order:
                r.times.append(r.run(r.variant.block, clock, sync, per_step_timing))
            rounds += 1
            if args.rounds is not None:
                if rounds >= args.rounds:
                    break
            elif rounds >= args.min_rounds and time.monotonic() > deadline:
                break
    finally:
        for r in runners.values():
            r.hooks.close()
        if wandb_run is not None:
            wandb_run.finish()
        tmp.cleanup()
    return runners


# -- reporting ----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    ms: float | None = None
    ratio: float | None = None
    lo: float = math.nan
    hi: float = math.nan
    note: str = ""


def per_round(r: Runner) -> torch.Tensor:
    """Mean seconds per step of each round's block."""
    return torch.tensor([sum(block) / len(block) for block in r.times], dtype=torch.float64)


def guard_vs_clip(runners: dict[str, Runner]) -> tuple[float, float, float] | None:
    """The guard's step time over clip_grad_norm_'s, paired within rounds, with its 95 % interval."""
    if "guard" not in runners or "clip" not in runners:
        return None
    return ratio_ci(per_round(runners["guard"]), per_round(runners["clip"]))


def summarise(variants: list[Variant], runners: dict[str, Runner]) -> dict[str, Result]:
    base = per_round(runners["none"])
    out = {}
    for v in variants:
        r = runners.get(v.key)
        if r is None:
            out[v.key] = Result(v.name, note=f"n/a ({v.unavailable})")
            continue
        times = per_round(r)
        ratio, lo, hi = ratio_ci(times, base)
        note = f"{v.block} steps/round, {r.steps} in all"
        if v.key == "wandb" and r.steps < 1000:
            note += "; histograms every 1000 steps: none reached"
        out[v.key] = Result(v.name, float(times.quantile(0.5)) * 1e3, ratio, lo, hi, note)
    return out


def table(results: dict[str, Result]) -> str:
    rows = []
    for res in results.values():
        if res.ms is None:
            rows.append([res.name, "", "", "", "", res.note])
            continue
        ci = "" if math.isnan(res.lo) or res.name == "none" else f"[{res.lo:.3f}, {res.hi:.3f}]"
        rows.append([res.name, f"{res.ms:.2f}", f"{res.ratio:.3f}×", ci, f"{(res.ratio - 1) * 100:+.1f} %", res.note])
    return format_table(["variant", "ms/step", "ratio", "95% CI", "overhead", ""], rows, "<>>>><")


def _ratio(results: dict[str, Result], key: str) -> float | None:
    res = results.get(key)
    return None if res is None else res.ratio


def naive_vs(results: dict[str, Result], key: str) -> float | None:
    """How many times the naive loop's overhead exceeds variant ``key``'s."""
    naive, other = _ratio(results, "naive"), _ratio(results, key)
    if naive is None or other is None:
        return None
    if naive <= 1:
        return math.nan  # the naive loop's cost is lost in the noise: no meaningful ratio
    return math.inf if other <= 1 else (naive - 1) / (other - 1)


def _times(value: float | None) -> str:
    return "n/a" if value is None else "within noise" if math.isnan(value) else "∞" if value == math.inf else f"{value:.1f}×"


def goal_rows(workloads: list[Workload], all_results: dict[str, dict[str, Result]], pairs: dict) -> list[list[str]]:
    def goal(value: float | None, ok: Callable[[float], bool], text: str, binding: bool) -> str:
        return "n/a" if value is None else f"{text} {mark(ok(value))}" if binding else f"{text} (stress)"

    rows = []
    for w in workloads:
        res = all_results[w.name]
        d, e, floor, aa = (_ratio(res, k) for k in ("default", "every", "floor", "aa"))
        nv = naive_vs(res, "guard")
        many = w.name == WORKLOADS[MANY_TENSORS].name
        gc = pairs.get(w.name)
        if gc is None:
            gc_text = "n/a"
        else:  # met unless the interval lies wholly above 1: "no more than", within the noise
            ratio, lo, hi = gc
            gc_text = goal(lo, lambda x: not x > 1, f"{ratio:.3f}× [{lo:.3f}, {hi:.3f}]", w.goals)
        rows.append(
            [
                w.name,
                goal(d, lambda x: x <= GOALS["default"], f"{d:.3f}×" if d else "", w.goals),
                goal(e, lambda x: x <= GOALS["every"], f"{e:.3f}×" if e else "", w.goals),
                gc_text,
                goal(nv, lambda x: x >= GOALS["naive_vs_guard"], _times(nv), many) if many or nv is None else _times(nv) + " (info)",
                _times(naive_vs(res, "every")),
                "n/a" if floor is None else f"{floor:.3f}×",
                "n/a" if aa is None else f"{aa:.3f}×",
            ]
        )
    return rows


def profile_agent(workload: Workload, device: torch.device, settings: dict, clock: Callable[[], float], steps: int = 250) -> str:
    """Where the agent's time goes: its optimizer hooks timed alone over ``steps`` steps (by
    default one full period of the default sampling), then the same steps again under
    cProfile for the breakdown.

    Each gradient is read from Python once, untimed, before the hook: the first read creates
    its Python object, a cost the optimizer pays when the agent does not (with 406 tensors
    0.1-0.25 ms inside the training loop, which would otherwise be charged to the agent's own time)."""
    import gradwatch.agent

    torch.manual_seed(0)
    model = workload.build().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [tuple(t.to(device) for t in b) for b in workload.batches(torch.Generator().manual_seed(1))]
    agent = gradwatch.agent.watch(model, opt, run="bench", port=0, **settings)
    mon = agent.monitor
    params = list(model.parameters())
    before, after = mon.before_step, mon.after_step
    spent = [0.0, 0.0]
    prof = cProfile.Profile()
    profiling = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, slot):
        def wrapper():
            for p in params:  # the first read of each gradient from Python, untimed (see above)
                p.grad
            if profiling:
                prof.enable()
            sync()
            t = clock()
            fn()
            sync()
            spent[slot] += clock() - t
            if profiling:
                prof.disable()

        return wrapper

    def train(n):
        for i in range(n):
            _one_step(model, opt, batches[i % len(batches)], workload.loss, agent)

    try:
        train(10)
        mon.before_step, mon.after_step = timed(before, 0), timed(after, 1)
        train(steps)
        wall = [x / steps * 1e3 for x in spent]
        profiling = True
        train(steps)
    finally:
        mon.before_step, mon.after_step = before, after
        agent.close()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    body = out.getvalue()
    body = body[body.index("   ncalls"):].rstrip()
    head = (f"{workload.name}, watch({', '.join(f'{k}={v}' for k, v in settings.items())}): "
            f"before_step {wall[0]:.2f} ms + after_step {wall[1]:.2f} ms per step (mean over {steps} steps); "
            f"cProfile of another {steps} steps, top 12 by own time:")
    return head + "\n" + body


def _one_step(model, opt, batch, loss_fn, agent) -> None:
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    agent.observe(loss=loss)
    opt.step()


def _agent_version() -> str:
    """The commit the measured agent comes from, and whether agent/ had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "agent"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "gradwatch (no git information)"
    return f"gradwatch {sha}" + (" + uncommitted changes in agent/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="about a minute: one round per model, shorter blocks (rough numbers, no intervals)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps of a 10-step variant per model (rounds = N/10; `none` runs 2x, the 50-step agent variants 5x); "
                   "default: rounds until the model's time budget is spent")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cuda-sync", default="step", choices=["step", "block"],
                   help="cuda: synchronize after every step (default) or only around each block, which keeps CPU/GPU "
                   "overlap so a host sync shows its full cost")
    p.add_argument("--clock", default=None, choices=["cpu", "wall"],
                   help="cpu (default on cpu): this process's CPU time, which other tenants of a shared machine "
                   "do not inflate; wall (always on cuda): elapsed time, right on a quiet machine")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: this 2-core machine is much slower with 2)")
    p.add_argument("--models", default=None, help=f"comma-separated model indices 0-{len(WORKLOADS) - 1} (default: all)")
    p.add_argument("--variants", default=None, help="comma-separated variant keys to run besides `none` "
                   "(aa, default, every, all, guard, floor, clip, naive, lightning, wandb1, wandb; default: all)")
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb variants")
    p.add_argument("--save", default=None, metavar="PATH", help="write every measured step time (JSON) for later analysis")
    p.add_argument("--profile", action="store_true", help="also cProfile the agent's hooks (every step and default) on each model")
    args = p.parse_args(argv)
    args.rounds = math.ceil(args.steps / 10) if args.steps else None
    args.min_rounds = 3  # a slow model on a busy machine still ends within the 10-minute run
    args.warmup_steps = 10
    variants = build_variants(not args.no_wandb)
    if args.variants:
        keep = {"none", *args.variants.split(",")}
        variants = [v for v in variants if v.key in keep]
    if args.quick:
        args.rounds = args.rounds or 1
        args.warmup_steps = 3
        for v in variants:  # keep the agent's 50-step sampling period; shorten the others
            v.block = {"default": 50, "every": 50, "none": 10, "wandb1": 1}.get(v.key, 5)

    if args.device == "cuda":
        args.clock = "wall"  # GPU work uses no CPU time
    args.clock = args.clock or "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"--device cuda: CUDA is not available here (torch {torch.__version__}); nothing measured.")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    logging.getLogger("gradwatch.agent").setLevel(logging.WARNING)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} logical CPUs)"
    sync = f", cuda sync per {args.cuda_sync}" if device.type == "cuda" else ""
    print("\n".join(header_lines({
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": dev + sync,
        "clock": "process CPU time (time.process_time)" if args.clock == "cpu" else "wall (time.perf_counter)",
        "agent": _agent_version(),
    })))
    budget = f"{args.rounds} rounds" if args.rounds else "rounds until the model's time budget is spent (at least %d)" % args.min_rounds
    print(f"method:   one model+Adam per variant, interleaved rounds (one block per variant, shuffled order), "
          f"{args.warmup_steps} warm-up steps each; {budget}")

    workloads = WORKLOADS if args.models is None else [WORKLOADS[int(i)] for i in args.models.split(",")]
    all_results: dict[str, dict[str, Result]] = {}
    raw: dict[str, dict[str, list[list[float]]]] = {}
    pairs: dict[str, tuple[float, float, float] | None] = {}
    for w in workloads:
        t0, load_before = time.monotonic(), os.getloadavg()[0]
        own = [copy.copy(v) for v in variants]  # availability is decided per model
        runners = measure(w, own, device, args)
        params = list(runners["none"].model.parameters())
        results = summarise(own, runners)
        raw[w.name] = {key: r.times for key, r in runners.items()}
        pairs[w.name] = guard_vs_clip(runners)
        all_results[w.name] = results
        print(f"\n## {w.name}: {len(params)} parameter tensors, {sum(q.numel() for q in params) / 1e6:.2f} M parameters, Adam; "
              f"{len(runners['none'].times)} rounds ({time.monotonic() - t0:.0f} s, load average {load_before:.1f} → {os.getloadavg()[0]:.1f})")
        print(table(results))
        sys.stdout.flush()

    if args.save:
        with open(args.save, "w") as f:
            json.dump({"command": command_line(), "seconds_per_step": raw}, f)
    print("\n## Summary: ratio to `none`; goals from the issue (stress models are shown, not judged)")
    print(format_table(
        ["model", f"default ≤ {GOALS['default']}×", f"every=1 ≤ {GOALS['every']}×", "guard / clip_grad_norm_ ≤ 1× [95% CI]",
         f"naive/guard overhead ≥ {GOALS['naive_vs_guard']:.0f}×", "naive/every=1 overhead", "floor (one L2 pass)", "A/A (noise)"],
        goal_rows(workloads, all_results, pairs), "<<<<<<<<",
    ))
    many = all_results.get(WORKLOADS[MANY_TENSORS].name, {})
    if naive_vs(many, "guard") is not None:
        print(f"\n{WORKLOADS[MANY_TENSORS].name}: naive .item() loop overhead {(many['naive'].ratio - 1) * 100:+.1f} %, "
              f"guard {(many['guard'].ratio - 1) * 100:+.1f} % → naive/guard = {_times(naive_vs(many, 'guard'))} "
              f"(goal ≥ {GOALS['naive_vs_guard']:.0f}×)")
    if args.profile:
        for w in workloads:
            for settings in ({"every": 1, "detail_every": 1}, {}):
                print("\n## profile: " + profile_agent(w, device, settings, time.process_time if args.clock == "cpu" else time.perf_counter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
