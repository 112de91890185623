"""Bounded `layer` labels: module grouping and a top-k cap, folded exactly from per-tensor sums."""

import math

import pytest
import torch

from gradwatch.agent.layers import OTHER, module_of
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of


def grads_by(model, key):
    groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(key(name), []).append((p.grad.detach().double(), p.detach().double()))
    return groups


def reference(pairs):
    g = torch.cat([gr.flatten() for gr, _ in pairs])
    w = torch.cat([p.flatten() for _, p in pairs])
    return {
        m.GRAD_NORM: g.norm().item(),
        m.GRAD_ABS_MEAN: g.abs().mean().item(),
        m.GRAD_ABS_MAX: g.abs().max().item(),
        m.GRAD_ABS_MIN: g.abs().min().item(),
        m.PARAM_NORM: w.norm().item(),
    }


def step_once(model, opt):
    """Forward and backward; the caller reads the gradients, then calls opt.step()."""
    opt.zero_grad()
    loss_of(model, model.example(torch.Generator().manual_seed(0))).backward()


def test_module_grouping_matches_reference(attach):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1, detail_every=1, layers="module")
    step_once(model, opt)
    expected = {k: reference(v) for k, v in grads_by(model, module_of).items()}
    opt.step()
    assert set(expected) == {"layers.0", "layers.2", "layers.4", "head"}
    for layer, values in expected.items():
        for metric, want in values.items():
            assert sample(agent, metric, layer=layer) == pytest.approx(want, rel=1e-5), (layer, metric)
    assert sample(agent, m.GRAD_NORM, layer="head.weight") is None


def test_top_k_keeps_the_largest_layers_and_aggregates_the_rest(attach):
    torch.manual_seed(0)
    model = MLP(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1, detail_every=1, top_k=3)
    step_once(model, opt)
    per_tensor = grads_by(model, lambda n: n)
    norms = {n: reference(v)[m.GRAD_NORM] for n, v in per_tensor.items()}
    top = sorted(norms, key=norms.get, reverse=True)[:3]
    rest = [pair for n, pairs in per_tensor.items() if n not in top for pair in pairs]
    opt.step()
    exported = {
        s.labels["layer"] for f in agent.registry.collect() if f.name == m.GRAD_NORM for s in f.samples
    }
    assert exported == {*top, OTHER}
    for metric, want in reference(rest).items():
        assert sample(agent, metric, layer=OTHER) == pytest.approx(want, rel=1e-5), metric
    assert sample(agent, m.UPDATE_RATIO, layer=OTHER) is None  # not measured until the next transfer
    step_once(model, opt)
    opt.step()
    assert math.isfinite(sample(agent, m.UPDATE_RATIO, layer=OTHER))


def test_layer_depth_follows_model_order(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1)
    step_once(model, opt)
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    assert [sample(agent, m.LAYER_DEPTH, layer=n) for n in names] == list(range(len(names)))
