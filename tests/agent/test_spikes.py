"""The guard's answer to a finite spike: after its warm-up, a step whose global gradient norm
exceeds mean + 6σ of the recent calm steps is clipped to that bound (not skipped), the spike stays
out of the history, and the log names the layer that carries most of the rise."""

import copy
import logging
import math

import pytest
import torch

from gradwatch.agent.spikes import WARMUP, SpikeGuard
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of


def grad_norm(model) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


def test_a_spike_is_clipped_to_mean_plus_six_sigma_and_its_layer_named(attach, caplog):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    agent = attach(model, opt)
    gen = torch.Generator().manual_seed(1)
    history: list[float] = []
    spike = WARMUP + 10
    for i in range(spike + 3):
        inputs = model.example(gen)
        for net, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            loss_of(net, inputs).backward()
            if i == spike:
                net.layers[2].weight.grad.mul_(1e3)  # the third Linear layer goes first
        norm = grad_norm(reference)
        if i == spike:  # the reference: global-norm clip to mean + 6σ of the last calm steps
            window = history[-WARMUP:]
            mean = sum(window) / len(window)
            bound = mean + 6 * math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
            assert norm > bound
            for p in reference.parameters():
                p.grad.mul_(bound / norm)
        else:
            history.append(norm)
        with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
            opt.step()
        ref_opt.step()

    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert sample(agent, m.SPIKE_CLIPPED_STEPS_TOTAL) == 1
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 0
    (line,) = [r.getMessage() for r in caplog.records if "6σ" in r.getMessage()]
    assert f"step {spike + 1}:" in line and "most of it in layer 'layers.2.weight'" in line
    # the history holds the calm steps only: the spike never raises its own bound
    assert list(agent.monitor.spikes.norms) == pytest.approx(history[-WARMUP:], rel=1e-4)


def test_no_spike_is_called_during_the_warm_up(attach):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt)
    gen = torch.Generator().manual_seed(1)
    for i in range(WARMUP - 1):
        opt.zero_grad()
        loss_of(model, model.example(gen)).backward()
        if i == WARMUP - 2:
            model.head.weight.grad.mul_(1e6)  # huge, but the guard has no history to judge it by yet
        opt.step()
    assert sample(agent, m.SPIKE_CLIPPED_STEPS_TOTAL) == 0


def test_the_bound_follows_the_window_as_norms_come_and_go():
    guard = SpikeGuard(6.0)
    gen = torch.Generator().manual_seed(0)
    # a calm regime, then a change of scale: the window's mean and σ are kept up to date, not recomputed
    norms = torch.cat([torch.rand(300, generator=gen) + 1.0, 1e3 + torch.rand(300, generator=gen) * 1e-2]).tolist()
    for i, norm in enumerate(norms):
        guard.record(norm)
        window = norms[max(0, i + 1 - WARMUP) : i + 1]
        if len(window) < WARMUP:
            assert guard.bound() is None
            continue
        mean = sum(window) / len(window)
        std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window))
        assert guard.bound() == pytest.approx(mean + 6 * std, rel=1e-9), i
