"""Each demo scenario does what it claims, measured by a plain reference loop (no gradwatch).

The exploding_rnn tests replay the remediation the watchdog is meant to apply - skip
non-finite steps; K steps after the first spike (global norm > 10x the mean of the last 50
steps) clip at 2x the median of those norms and halve the LR - with plain torch.
Runs are seeded and take one CPU thread; a full 1200-step exploding_rnn run takes ~10 s.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import pytest
import torch

from demo import scenarios

# -- reference helpers ---------------------------------------------------------------------------


def global_norm(model: torch.nn.Module) -> float:
    """sqrt(sum of squared gradient elements) over all parameters, in float64 (NaN/Inf pass through)."""
    squares = [p.grad.detach().double().square().sum() for p in model.parameters() if p.grad is not None]
    return torch.stack(squares).sum().sqrt().item()


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Matrix-shaped weights, input side first (biases and norm scales make update ratios meaningless)."""
    return [(n, p) for n, p in model.named_parameters() if "weight" in n and p.dim() >= 2]


def update_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """mean|dw| / mean|w| of the update actually applied (DL4J's update:parameter ratio)."""
    return ((after - before).abs().mean() / before.abs().mean()).item()


def depth_ratio(model: torch.nn.Module) -> float:
    """log10(mean|grad| of the first weight / mean|grad| of the last weight)."""
    weights = weight_tensors(model)
    first, last = (p.grad.abs().mean().item() for _, p in (weights[0], weights[-1]))
    return math.log10(first / last) if first > 0 else -math.inf


SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 50
SPIKE_START = 100  # the first hundred steps (loss and norm falling fast) are no reference


@dataclass
class Trace:
    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # per step: the largest update ratio of any weight
    depths: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    spike_step: int | None = None
    remedy_step: int | None = None
    final: float = math.nan  # held-out loss at the end


def train(
    sc: scenarios.Scenario,
    steps: int | None = None,
    *,
    clip: float | None = None,
    skip_nonfinite: bool = False,
    remedy_after: int | None = None,
    stop_when_nonfinite: bool = False,
    track: bool = False,
) -> Trace:
    """The reference loop. ``remedy_after=K``: K steps after the first spike, clip at 2x the median
    of the norms before it and scale the LR by 0.5 (around the scheduler, which owns group['lr'])."""
    trace = Trace()
    clip = clip if clip is not None else sc.clip_norm
    lr_scale, finite_norms = 1.0, []
    for step in range(steps or sc.steps):
        loss = scenarios.train_step(sc, step).item()
        norm = global_norm(sc.model)
        trace.losses.append(loss)
        trace.norms.append(norm)
        finite = math.isfinite(norm)
        if remedy_after is not None:
            recent = finite_norms[-SPIKE_WINDOW:]
            if trace.spike_step is None and step >= SPIKE_START and finite and norm > SPIKE_FACTOR * statistics.fmean(recent):
                trace.spike_step, spike_threshold = step, 2 * statistics.median(recent)
            if trace.spike_step is not None and trace.remedy_step is None and step >= trace.spike_step + remedy_after:
                trace.remedy_step, clip, lr_scale = step, spike_threshold, 0.5
        if finite:
            finite_norms.append(norm)
        if track:
            trace.depths.append(depth_ratio(sc.model))
        if skip_nonfinite and not finite:
            trace.skipped.append(step)
        else:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(sc.model.parameters(), clip)
            before = [p.detach().clone() for _, p in weight_tensors(sc.model)] if track else []
            for group in sc.optimizer.param_groups:
                group["lr"] *= lr_scale
            sc.optimizer.step()
            for group in sc.optimizer.param_groups:
                group["lr"] /= lr_scale
            if track:
                trace.ratios.append(max(update_ratio(b, p.detach()) for b, (_, p) in zip(before, weight_tensors(sc.model))))
        if sc.scheduler is not None:
            sc.scheduler.step()
        if stop_when_nonfinite and not (finite and math.isfinite(loss)):
            break
    trace.final = scenarios.evaluate(sc)
    return trace


def params_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Module fixtures run before conftest's per-test one, and these runs are long (FIELD_NOTES §2).
    torch.set_num_threads(1)


# -- catalogue -------------------------------------------------------------------------------------


def test_every_scenario_builds_describes_itself_and_replays_its_batches():
    for name in scenarios.NAMES:
        assert len(scenarios.describe(name)) > 100, name
    a, b = scenarios.build("healthy_mlp", seed=3), scenarios.build("healthy_mlp", seed=3)
    assert torch.equal(a.batch(7)[0], a.batch(7)[0])
    assert [scenarios.train_step(a, s).item() for s in range(3)] == [scenarios.train_step(b, s).item() for s in range(3)]
    other = scenarios.build("healthy_mlp", seed=4)
    assert not torch.equal(other.batch(7)[0], a.batch(7)[0])
    assert not torch.equal(a.batch(7)[0], a.eval_batch[0][: a.batch(7)[0].shape[0]])


def test_build_rejects_unknown_names_and_settings():
    with pytest.raises(ValueError, match="exploding_rnn"):
        scenarios.build("exploding")
    with pytest.raises(ValueError, match="peak_lr"):
        scenarios.build("exploding_rnn", lr=0.1)


def test_train_step_leaves_the_optimizer_step_to_the_caller():
    sc = scenarios.build("exploding_rnn")
    before = [p.detach().clone() for p in sc.model.parameters()]
    scenarios.train_step(sc, 0)
    assert all(torch.equal(b, p) for b, p in zip(before, sc.model.parameters()))
    assert all(p.grad is not None for p in sc.model.parameters())


# -- exploding_rnn -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clipped_from_start() -> Trace:
    sc = scenarios.build("exploding_rnn")
    return train(sc, clip=sc.info["safe_clip_norm"])


def test_exploding_rnn_trains_then_explodes_without_protection():
    trace = train(scenarios.build("exploding_rnn"), stop_when_nonfinite=True)
    healthy_median = statistics.median(trace.norms[50:150])
    boom = next(i for i, n in enumerate(trace.norms) if not n < 100 * healthy_median)  # NaN counts
    dead = next(i for i, (l, n) in enumerate(zip(trace.losses, trace.norms)) if not (math.isfinite(l) and math.isfinite(n)))

    assert statistics.fmean(trace.losses[120:130]) < statistics.fmean(trace.losses[:10]) / 30  # a healthy start
    calm = max(i for i in range(boom) if trace.norms[i] < 10 * healthy_median)
    assert boom > 300, "the explosion comes after a long healthy phase"
    assert boom - calm <= 40 and dead - boom <= 30, "under 10x to 100x to non-finite within a few dozen steps"
    assert max(n for n in trace.norms if math.isfinite(n)) > 1e6 * healthy_median


def test_exploding_rnn_clipped_from_start_trains_to_near_the_noise_floor(clipped_from_start):
    floor = scenarios.build("exploding_rnn").info["loss_floor"]
    assert all(math.isfinite(n) for n in clipped_from_start.norms)
    assert clipped_from_start.final < 1.5 * floor
    assert statistics.fmean(clipped_from_start.losses[-50:]) < statistics.fmean(clipped_from_start.losses[:10]) / 50


@pytest.mark.parametrize("k", [20, 40])
def test_exploding_rnn_remediated_k_steps_after_the_first_spike_matches_clipping_from_start(k, clipped_from_start):
    trace = train(scenarios.build("exploding_rnn"), skip_nonfinite=True, remedy_after=k)
    assert trace.spike_step is not None and trace.remedy_step == trace.spike_step + k
    assert math.isfinite(trace.final)
    assert abs(trace.final / clipped_from_start.final - 1) < 0.10


# -- nan_batch ------------------------------------------------------------------------------------


def test_nan_batch_poisons_an_unguarded_run_and_costs_nothing_when_skipped():
    sc = scenarios.build("nan_batch")
    nan_step = sc.info["nan_step"]
    assert not torch.isfinite(sc.batch(nan_step)[0]).all() and torch.isfinite(sc.batch(nan_step - 1)[0]).all()

    unguarded = train(scenarios.build("nan_batch"), steps=nan_step + 1)
    assert all(math.isfinite(l) for l in unguarded.losses[:nan_step])
    assert not math.isfinite(unguarded.losses[nan_step]) and not math.isfinite(unguarded.norms[nan_step])
    assert not math.isfinite(unguarded.final)

    guarded_sc = scenarios.build("nan_batch")
    guarded = train(guarded_sc, skip_nonfinite=True)
    clean = train(scenarios.build("healthy_mlp"))
    assert guarded.skipped == [nan_step]
    assert params_finite(guarded_sc.model)
    assert abs(guarded.final / clean.final - 1) < 0.05


# -- vanishing ------------------------------------------------------------------------------------


def test_vanishing_first_layer_gradients_are_orders_of_magnitude_smaller_and_loss_stays_flat():
    trace = train(scenarios.build("vanishing"), steps=300, track=True)
    assert statistics.median(trace.depths) < -12  # measured about -16
    assert statistics.fmean(trace.losses[-50:]) > 0.95 * statistics.fmean(trace.losses[:50])
    assert trace.final > 0.6  # ln 2 = 0.69: still guessing


# -- lr_too_high ----------------------------------------------------------------------------------


def test_lr_too_high_pushes_update_ratios_past_1e_2_and_ends_worse_than_a_sane_lr():
    too_high = train(scenarios.build("lr_too_high", steps=300), track=True)
    sane = train(scenarios.build("healthy_transformer", steps=300), track=True)

    # While the LR is at or near its peak (warm-up ends at step 100).
    assert statistics.median(too_high.ratios[50:250]) > 1e-2
    assert max(too_high.ratios) > 0.1
    assert statistics.median(sane.ratios[50:250]) < 1e-2
    assert too_high.final > 1.5 * sane.final


# -- healthy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", scenarios.HEALTHY)
def test_healthy_runs_fall_and_show_no_pathology(name):
    sc = scenarios.build(name)
    initial = scenarios.evaluate(sc)
    trace = train(sc, track=True)

    assert all(math.isfinite(x) for x in trace.losses + trace.norms)
    assert trace.final < 0.7 * initial
    assert statistics.fmean(trace.losses[-50:]) < statistics.fmean(trace.losses[:50])
    spikes = [trace.norms[i] / statistics.fmean(trace.norms[i - SPIKE_WINDOW : i]) for i in range(SPIKE_WINDOW, len(trace.norms))]
    assert max(spikes) < 5  # GradNormSpike needs 10x
    assert max(trace.ratios) < 0.1  # UpdateRatioTooHigh needs > 1
    assert statistics.median(trace.depths) > -3  # VanishingGradients needs < -6


def test_early_explosion_reaches_nan_inside_the_guards_warm_up_and_clipping_from_start_holds_it():
    torch.set_num_threads(1)
    plain, clipped = scenarios.build("early_explosion", seed=0), scenarios.build("early_explosion", seed=0)
    clipped.clip_norm = clipped.info["safe_clip_norm"]
    first_nonfinite = None
    for step in range(130):
        loss = scenarios.train_step(plain, step)
        scenarios.optimizer_step(plain)
        if first_nonfinite is None and not math.isfinite(loss.item()):
            first_nonfinite = step
    assert first_nonfinite is not None and 100 <= first_nonfinite < 128  # before a 128-step guard warm-up ends
    for step in range(130):
        scenarios.train_step(clipped, step)
        scenarios.optimizer_step(clipped)
    assert math.isfinite(scenarios.evaluate(clipped))
