"""The cases `remediation_quality.py` runs: healthy hard negatives and pathologies.

Each case is a recipe of :mod:`gradwatch.demo.scenarios` (built there, never copied) with
what makes its story: an injected fault (a corrupted batch, NaN batches, an LR set wrong),
a broken schedule, a data switch, or a model of its own where the demo has none (the
saddle escape). Every case is seeded: the same seed gives the same run, step for step.

Sizes are chosen for a 2-core machine (about 10-25 ms a step on one thread): recurrent
runs use batch 32 and 20-step sequences instead of the demo's 128 x 40.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradwatch.demo import scenarios
from gradwatch.demo.scenarios import Scenario

SMALL_RNN = {"batch": 32, "length": 20}


@dataclass(frozen=True)
class Case:
    name: str
    healthy: bool
    story: str
    build: Callable[[int, bool], Scenario]
    """build(seed, quick) -> a fresh scenario. ``info["onset"]``: the 0-based loop step where an
    injected fault starts; a pathology without one has its onset measured on the unmonitored
    run (the first step whose gradient norm is 10x the median of the 50 before it)."""
    explosion: bool = False
    """Judged against the explosion goals (rescue, latency)."""


def _with_batches(sc: Scenario, change: Callable[[int, tuple], tuple]) -> Scenario:
    original = sc.batch
    return dataclasses.replace(sc, batch=lambda step: change(step, original(step)))


def _with_lr_factor(sc: Scenario, factor: Callable[[int], float]) -> Scenario:
    """The recipe's schedule times ``factor(step)`` (a broken or mis-set schedule)."""
    inner = sc.scheduler
    base = [g["lr"] for g in sc.optimizer.param_groups] if inner is None else list(inner.base_lrs)
    if inner is None:
        return dataclasses.replace(sc, scheduler=torch.optim.lr_scheduler.LambdaLR(sc.optimizer, factor))
    lambdas = inner.lr_lambdas
    for group, lr in zip(sc.optimizer.param_groups, base):
        group["initial_lr"] = lr
    schedule = torch.optim.lr_scheduler.LambdaLR(
        sc.optimizer, [lambda step, f=f: f(step) * factor(step) for f in lambdas]
    )
    return dataclasses.replace(sc, scheduler=schedule)


# -- healthy hard negatives ----------------------------------------------------------------


class _DeepLinear(nn.Module):
    def __init__(self, features: int, width: int, out: int, depth: int, init: float) -> None:
        super().__init__()
        sizes = [features] + [width] * (depth - 1) + [out]
        self.layers = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:])))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=init)

    def forward(self, x):
        return self.layers(x)


def _saddle_escape(seed: int, quick: bool) -> Scenario:
    """A deep linear network from a small init (Saxe, McClelland & Ganguli 2014): the loss sits
    on a plateau while the weights grow out of the saddle at the origin, then falls sharply;
    at that moment the gradient norm rises 10-20x its plateau median, on an improving loss."""
    features, out, steps = 16, 4, 250
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    teacher = torch.randn(features, out, generator=gen) / features**0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _DeepLinear(features, 16, out, depth=3, init=0.02)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)

    def batch(step: int, size: int = 128):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x = torch.randn(size, features, generator=g)
        return x, x @ teacher + 0.1 * torch.randn(size, out, generator=g)

    eval_gen = torch.Generator().manual_seed(seed * 1_000_003 + 10**9)
    x = torch.randn(1024, features, generator=eval_gen)
    return Scenario("saddle_escape", model, optimizer, None, batch, F.mse_loss, steps,
                    (x, x @ teacher + 0.1 * torch.randn(1024, out, generator=eval_gen)))


def _lr_warmup(seed: int, quick: bool) -> Scenario:
    return scenarios.build("healthy_rnn", seed, steps=150 if quick else 250, **SMALL_RNN)


def _data_switch(seed: int, quick: bool) -> Scenario:
    """A new data source from step 150 (a curriculum's next stage): the batches of another
    teacher. The loss and the gradient norm jump, then the model adapts; judged on the new data."""
    switch = 100 if quick else 150
    sc = scenarios.build("healthy_mlp", seed, steps=switch + 150)
    other = scenarios.build("healthy_mlp", seed + 1000)
    sc = _with_batches(sc, lambda step, b: other.batch(step) if step >= switch else b)
    return dataclasses.replace(sc, eval_batch=other.eval_batch)


def _finetune_start(seed: int, quick: bool) -> Scenario:
    return scenarios.build("healthy_finetune", seed, steps=150 if quick else 250)


def _cosine_tail(seed: int, quick: bool) -> Scenario:
    return scenarios.build("healthy_mlp", seed, steps=150 if quick else 300)


# -- pathologies ---------------------------------------------------------------------------


def _explosion_early(seed: int, quick: bool) -> Scenario:
    """The exploding_rnn recipe with a 100-step warm-up: it goes over the cliff near step 100."""
    return scenarios.build("exploding_rnn", seed, warmup=100, steps=140 if quick else 200, **SMALL_RNN)


LATE_LR_STEP = 300


def _explosion_late(seed: int, quick: bool) -> Scenario:
    """A calm recurrent run (the healthy_rnn recipe without its clipping) whose LR is set 8x too
    high from step 300 (a resume with the wrong LR): it explodes after 300 calm steps."""
    sc = scenarios.build("healthy_rnn", seed, steps=450, clip_norm=None, **SMALL_RNN)
    sc.info["onset"] = LATE_LR_STEP
    return _with_lr_factor(sc, lambda step: 8.0 if step >= LATE_LR_STEP else 1.0)


CORRUPT_STEP = 200


def _corrupted_batch(seed: int, quick: bool) -> Scenario:
    """One corrupted batch (targets stored in the wrong unit, x1e4) in a healthy MLP run."""
    step_at = 100 if quick else CORRUPT_STEP
    sc = scenarios.build("healthy_mlp", seed, steps=step_at + (50 if quick else 100))
    sc.info["onset"] = step_at
    return _with_batches(sc, lambda step, b: (b[0], b[1] * 1e4) if step == step_at else b)


NAN_STEPS = (150, 160, 170)


def _nan_batches(seed: int, quick: bool) -> Scenario:
    """Three batches with a NaN feature, 10 steps apart (a bad shard read three times)."""

    def poison(step, b):
        if step not in NAN_STEPS:
            return b
        x = b[0].clone()
        x[0, 0] = float("nan")
        return x, b[1]

    sc = scenarios.build("healthy_mlp", seed, steps=250)
    sc.info["onset"] = NAN_STEPS[0]
    return _with_batches(sc, poison)


def _lr_drift(seed: int, quick: bool) -> Scenario:
    """A schedule bug: from step 100 the LR grows 2 % a step (x7 by step 200) until the
    recurrent dynamics go unstable."""
    sc = scenarios.build("healthy_rnn", seed, steps=350, clip_norm=None, **SMALL_RNN)
    return _with_lr_factor(sc, lambda step: 1.02 ** max(0, step - 100))


def _vanishing(seed: int, quick: bool) -> Scenario:
    sc = scenarios.build("vanishing", seed, steps=400)
    sc.info["onset"] = 0  # chronic: from the first step
    return sc


CASES: tuple[Case, ...] = (
    Case("saddle_escape", True, "plateau, then learning: the norm jumps on a falling loss", _saddle_escape),
    Case("lr_warmup", True, "linear LR warm-up over 100 steps (SGD + momentum RNN)", _lr_warmup),
    Case("data_switch", True, "a new data source at step 150", _data_switch),
    Case("finetune_start", True, "the start of a fine-tune at lr 1e-5", _finetune_start),
    Case("cosine_tail", True, "a cosine schedule down to 0", _cosine_tail),
    Case("explosion_early", False, "an RNN over the cliff before step 128", _explosion_early, explosion=True),
    Case("explosion_late", False, "LR 8x too high after 300 calm steps", _explosion_late, explosion=True),
    Case("corrupted_batch", False, "one batch with targets x1e4", _corrupted_batch, explosion=True),
    Case("nan_batches", False, "three NaN batches, 10 steps apart", _nan_batches),
    Case("lr_drift", False, "the LR drifting up 2 %/step from step 100", _lr_drift, explosion=True),
    Case("vanishing", False, "a 20-layer sigmoid MLP", _vanishing),
)
QUICK = ("lr_warmup", "corrupted_batch", "explosion_early")
