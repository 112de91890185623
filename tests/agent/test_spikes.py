"""The guard's answer to a finite spike (agent/spikes.py): after a short warm-up, a step whose
global gradient norm exceeds the robust bound (median + 6 x 1.4826 x MAD of the accepted steps,
at least 3x the median, wider while the history is short) is clipped to it and stays out of the
history; a held regime on a loss that is not rising is accepted after 3 steps; an explosion stays
held; the guard's state is exported (held fraction, peak held ratio per scraper, held step, bound)."""

import copy
import logging
import math
import statistics

import pytest
from prometheus_client.parser import text_string_to_metric_families
import torch

from gradwatch.agent.exporter import GradwatchCollector
from gradwatch.agent.spikes import CONFIRM, HELD_WINDOW, MIN_HISTORY, SpikeGuard
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def reference_bound(history: list[float], sigma: float = 6.0) -> float | None:
    """The documented bound, computed plainly from the accepted norms."""
    window = history[-128:]
    if len(window) < MIN_HISTORY:
        return None
    median = statistics.median(window)
    mad = statistics.median(abs(x - median) for x in window)
    widen = min(2.0, math.sqrt(64 / len(window)))
    return max(median + sigma * widen * 1.4826 * mad, 3.0 * widen * median)


class Vector(torch.nn.Module):
    """One parameter whose gradient a test sets directly: g = norm x a fixed unit vector."""

    def __init__(self, n: int = 8):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.direction = torch.ones(n) / math.sqrt(n)


def step_with_norm(agent, model, opt, norm: float, loss: float | None) -> float:
    """One optimizer step whose raw gradient has global norm ``norm``; returns the applied norm."""
    model.w.grad = model.direction * norm
    if loss is not None:
        agent.observe(loss=loss)
    before = model.w.detach().clone()
    opt.step()
    return float((before - model.w.detach()).norm())  # SGD lr 1: the update is the applied gradient


def calm_norms(n: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (1.0 + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).abs().tolist()


def test_a_spike_is_clipped_to_the_robust_bound_and_its_layer_named(attach, caplog):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    agent = attach(model, opt)
    gen = torch.Generator().manual_seed(1)
    history: list[float] = []
    spike = 150
    for i in range(spike + 3):
        inputs = model.example(gen)
        for net, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_of(net, inputs).backward()
            if i == spike:
                net.layers[2].weight.grad.mul_(1e3)  # the third Linear layer goes first
        norm = grad_norm(reference)
        bound = reference_bound(history)
        if i == spike:  # the reference: global-norm clip to the bound of the accepted steps
            assert norm > bound
            for p in reference.parameters():
                p.grad.mul_(bound / norm)
        else:
            assert bound is None or norm <= bound  # a healthy MLP run is never held
            history.append(norm)
        with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
            opt.step()
        ref_opt.step()

    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert sample(agent, m.SPIKE_CLIPPED_STEPS_TOTAL) == 1
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 0
    (line,) = [r.getMessage() for r in caplog.records if "guard's bound" in r.getMessage()]
    assert f"step {spike + 1}:" in line and "most of it in layer 'layers.2.weight'" in line
    # the history holds the accepted steps only: the spike never raises its own bound
    assert list(agent.monitor.spikes.norms) == pytest.approx(history[-128:], rel=1e-6)
    assert sample(agent, m.GUARD_BOUND) == pytest.approx(reference_bound(history), rel=1e-6)
    assert sample(agent, m.GUARD_HELD_STEP) == spike + 1


def test_the_bound_follows_the_accepted_history_as_norms_come_and_go():
    guard = SpikeGuard(6.0)
    gen = torch.Generator().manual_seed(0)
    # calm, a slow drift, a steady stretch (MAD near 0) and a gradual change of scale
    norms = torch.cat([
        torch.rand(200, generator=gen) + 1.0,
        torch.linspace(1.0, 3.0, 200),
        torch.full((100,), 3.0),
        torch.linspace(3.0, 8.0, 100) + 0.01 * torch.rand(100, generator=gen),
    ]).tolist()
    accepted: list[float] = []
    for i, norm in enumerate(norms):
        assert guard.bound() == pytest.approx(reference_bound(accepted), rel=1e-12) if accepted[MIN_HISTORY - 1 :] else guard.bound() is None, i
        verdict = guard.judge(norm, loss=1.0)
        assert verdict == "accept", (i, norm, guard.bound())
        accepted.append(norm)


def test_no_bound_before_the_short_warm_up_then_an_explosion_at_step_25_is_held(attach):
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    norms = calm_norms(24)
    for norm in norms[:MIN_HISTORY - 1]:
        assert step_with_norm(agent, model, opt, norm, loss=1.0) == pytest.approx(norm)
    assert sample(agent, m.GUARD_BOUND) is None  # warming up: no bound exported
    for norm in norms[MIN_HISTORY - 1 :]:
        step_with_norm(agent, model, opt, norm, loss=1.0)
    bound = reference_bound(norms)
    assert sample(agent, m.GUARD_BOUND) == pytest.approx(bound)
    # from step 25 the norm grows 4x a step and the loss with it: every step is held at the bound
    for k in range(30):
        applied = step_with_norm(agent, model, opt, 10.0 * 4.0**k, loss=1.0 + k)
        assert applied == pytest.approx(bound, rel=1e-5), k
    assert sample(agent, m.SPIKE_CLIPPED_STEPS_TOTAL) == 30
    assert sample(agent, m.GUARD_HELD_FRACTION) == pytest.approx(30 / HELD_WINDOW)
    assert sample(agent, m.GUARD_HELD_STEP) == 54
    assert list(agent.monitor.spikes.norms) == pytest.approx(norms)  # nothing exploded got in
    assert torch.isfinite(model.w).all()


@pytest.mark.parametrize("growth", [1.0, 1.3])
def test_a_learning_transition_is_accepted_after_a_short_confirmation(attach, caplog, growth):
    """A plateau, then the loss falls while the norm jumps 30x and stays up (a network starting to
    learn) or keeps growing (escaping a saddle): held for CONFIRM - 1 steps only, then the new
    regime is the history and is not held."""
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    gen = torch.Generator().manual_seed(3)
    for norm in calm_norms(100):
        step_with_norm(agent, model, opt, norm, loss=0.33 + 0.01 * float(torch.randn((), generator=gen)))
    jumped = [30.0 * min(growth**k, 5.0) * (1 + 0.1 * float(torch.randn((), generator=gen))) for k in range(60)]
    applied = []
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for k, norm in enumerate(jumped):
            applied.append(step_with_norm(agent, model, opt, norm, loss=0.30 * 0.97**k))
    held = sum(1 for a, n in zip(applied, jumped) if a < n * (1 - 1e-4))
    assert held == CONFIRM - 1
    assert applied[CONFIRM - 1 :] == pytest.approx(jumped[CONFIRM - 1 :], rel=1e-5)
    assert any("new regime" in r.getMessage() for r in caplog.records)
    assert jumped[-1] < sample(agent, m.GUARD_BOUND) < jumped[-1] * 10
    assert sample(agent, m.GUARD_HELD_FRACTION) == 0  # 60 steps on: the two held steps left the window
    # and the remediation's `auto` follows the new regime too, not the plateau's norms
    assert agent.remedy._auto_threshold("global_norm") == pytest.approx(2 * statistics.median(agent.monitor.spikes.norms))


@pytest.mark.parametrize("story", ["loss_rising", "norm_growing", "loss_not_finite"])
def test_a_jump_with_harm_in_sight_stays_held(attach, story):
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    for norm in calm_norms(100):
        step_with_norm(agent, model, opt, norm, loss=0.33)
    bound = sample(agent, m.GUARD_BOUND)
    for k in range(40):
        norm = 30.0 * (1.5**k if story == "norm_growing" else 1.0)
        loss = {"loss_rising": 0.34 * 1.1**k, "norm_growing": 0.33, "loss_not_finite": math.nan if k % 2 else 0.3}[story]
        assert step_with_norm(agent, model, opt, norm, loss=loss) == pytest.approx(bound, rel=1e-5), k
    assert sample(agent, m.GUARD_HELD_FRACTION) == pytest.approx(40 / HELD_WINDOW)


def test_held_ratio_peaks_per_scraper_and_reads_zero_without_a_held_step(attach):
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    norms = calm_norms(100)
    for norm in norms:
        step_with_norm(agent, model, opt, norm, loss=1.0)
    median = statistics.median(norms)
    collector = GradwatchCollector(agent.telemetry, "test", 0)
    user_agents = {"prometheus": "Prometheus/2.42.0", "watchdog": "gradwatch-watchdog/0.1.0"}

    def ratio(who: str) -> float:
        body, _ = collector.exposition("127.0.0.1", user_agents[who], "")
        (family,) = [f for f in text_string_to_metric_families(body.decode()) if f.name == m.GUARD_HELD_RATIO_MAX]
        return family.samples[0].value

    assert ratio("prometheus") == 0 and ratio("watchdog") == 0
    step_with_norm(agent, model, opt, 1e4 * median, loss=1.0)  # one catastrophic batch
    step_with_norm(agent, model, opt, 1.0, loss=1.0)
    assert ratio("prometheus") == pytest.approx(1e4)
    step_with_norm(agent, model, opt, 200 * median, loss=1.0)
    assert ratio("prometheus") == pytest.approx(200, rel=1e-2)  # the median moved a little
    assert ratio("watchdog") == pytest.approx(1e4)  # its own peak since its previous scrape
    assert ratio("watchdog") == 0 and ratio("prometheus") == 0


def test_a_skipped_nonfinite_step_counts_as_held(attach):
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    for norm in calm_norms(30):
        step_with_norm(agent, model, opt, norm, loss=1.0)
    step_with_norm(agent, model, opt, math.inf, loss=1.0)
    assert sample(agent, m.GUARD_HELD_STEP) == 31
    assert sample(agent, m.GUARD_HELD_FRACTION) == pytest.approx(1 / HELD_WINDOW)
    assert sample(agent, m.GUARD_HELD_RATIO_MAX) == 0  # finite spikes only: GradNonFinite tells this one


def test_a_data_switch_that_raises_loss_and_norm_together_is_accepted_once_the_loss_falls(attach):
    """A new data source: the first held step's loss (measured before any held update) is 5x the
    old level, and falls from there while the norm stays up: accepted after CONFIRM steps, where a
    loss that rose *after* the first held step (test above) stays held."""
    model = Vector()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt)
    for norm in calm_norms(100):
        step_with_norm(agent, model, opt, norm, loss=0.3)
    applied = [step_with_norm(agent, model, opt, 20.0, loss=1.5 * 0.98**k) for k in range(20)]
    assert sum(a < 20.0 * (1 - 1e-4) for a in applied) == CONFIRM - 1
