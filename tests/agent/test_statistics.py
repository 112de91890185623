"""Every exported per-layer value against a plain per-parameter reference loop."""

import math

import pytest
import torch

from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, ConvNet, SeqModel, Stacked, loss_of


def reference_grad_stats(model) -> dict[str, dict[str, float]]:
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().double()
        out[name] = {
            m.GRAD_NORM: g.norm().item(),
            m.GRAD_ABS_MEAN: g.abs().mean().item(),
            m.GRAD_ABS_MAX: g.abs().max().item(),
            m.GRAD_ABS_MIN: g.abs().min().item(),
            m.PARAM_NORM: p.detach().double().norm().item(),
        }
    return out


def rtol_for(dtype) -> float:
    # Statistics are carried in float32 whatever the model dtype; bfloat16 gradients are coarse themselves.
    return {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("model_cls", [MLP, ConvNet, SeqModel, Stacked])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_per_layer_gradient_stats_match_reference(attach, model_cls, dtype):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_cls().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1, detail_every=1)
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in model.example(gen)]
    loss_of(model, inputs).backward()
    expected = reference_grad_stats(model)  # before the step changes the parameters
    opt.step()

    for layer, values in expected.items():
        for metric, want in values.items():
            got = sample(agent, metric, layer=layer)
            assert got == pytest.approx(want, rel=rtol_for(dtype), abs=1e-30), (layer, metric)
    global_norm = math.sqrt(sum(v[m.GRAD_NORM] ** 2 for v in expected.values()))
    assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(global_norm, rel=rtol_for(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_tensors_read_in_pieces_match_reference(attach, monkeypatch, dtype):
    """A tensor larger than the probe's scratch buffer is read piece by piece (the last piece
    shorter); its statistics must not depend on where the pieces end."""
    from gradwatch.agent import probe

    monkeypatch.setattr(probe, "SCRATCH_ELEMENTS", 1000)
    torch.manual_seed(0)
    model = MLP(width=64, depth=1).to(dtype)  # every shape once: each tensor read alone, not stacked
    assert max(p.numel() for p in model.parameters()) > 2 * probe.SCRATCH_ELEMENTS
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1, detail_every=1)
    loss_of(model, [t.to(dtype) for t in model.example(torch.Generator().manual_seed(1))]).backward()
    expected = reference_grad_stats(model)
    opt.step()
    for layer, values in expected.items():
        for metric, want in values.items():
            assert sample(agent, metric, layer=layer) == pytest.approx(want, rel=rtol_for(dtype)), (layer, metric)


@pytest.mark.parametrize(
    "limits",
    [
        {"STACK_MAX_BYTES": 5 * 64 * 64 * 4},  # the 40 same-shape weights in stacks of 5
        {"STACKED_MAX_BYTES": 12 * 64 * 64 * 4},  # room for some stacks; the rest read one by one
        {"STACKABLE_BYTES": 64 * 4},  # only the biases stacked
    ],
    ids=["several-stacks", "capped-total", "small-only"],
)
def test_values_do_not_depend_on_how_tensors_are_stacked(attach, monkeypatch, limits):
    from gradwatch.agent import probe

    for name, value in limits.items():
        monkeypatch.setattr(probe, name, value)
    torch.manual_seed(0)
    model = Stacked()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1, detail_every=1)
    gen = torch.Generator().manual_seed(1)
    loss_of(model, model.example(gen)).backward()
    expected = reference_grad_stats(model)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.step()
    ratio = {
        n: (p.detach().double() - before[n]).abs().mean().item() / before[n].abs().mean().item()
        for n, p in model.named_parameters()
    }
    for layer, values in expected.items():
        for metric, want in values.items():
            assert sample(agent, metric, layer=layer) == pytest.approx(want, rel=1e-5), (layer, metric)
    opt.zero_grad()
    loss_of(model, model.example(gen)).backward()
    opt.step()  # the first step's update ratio reaches the host with this step's transfer
    for layer, want in ratio.items():
        assert sample(agent, m.UPDATE_RATIO, layer=layer) == pytest.approx(want, rel=1e-5), layer


def test_parameter_without_gradient_exports_no_gradient_stats(attach):
    model = SeqModel()
    opt = torch.optim.Adam(model.parameters())
    agent = attach(model, opt, every=1, detail_every=1)
    loss_of(model, model.example(torch.Generator().manual_seed(0))).backward()
    opt.step()
    assert model.unused.grad is None
    assert sample(agent, m.GRAD_NORM, layer="unused") is None
    assert sample(agent, m.GRAD_NORM, layer="embed.weight") > 0


@pytest.mark.parametrize("model_cls", [MLP, Stacked])
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adamw"])
def test_update_ratio_matches_applied_update(attach, optimizer, model_cls):
    torch.manual_seed(0)
    model = model_cls()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        if optimizer == "sgd_momentum"
        else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    agent = attach(model, opt, every=1, detail_every=3)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 7):
        opt.zero_grad()
        loss_of(model, model.example(gen)).backward()
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        opt.step()
        if step % 3 == 0:  # the ratio is measured on detail steps (and reaches the host with the next step)
            expected = {
                n: (p.detach().double() - before[n]).abs().mean().item() / before[n].abs().mean().item()
                for n, p in model.named_parameters()
            }
        if step % 3 == 1 and step > 1:
            for layer, want in expected.items():
                assert sample(agent, m.UPDATE_RATIO, layer=layer) == pytest.approx(want, rel=1e-5), layer


def test_statistics_only_on_sampled_steps(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=4, detail_every=8)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(9):
        opt.zero_grad()
        loss_of(model, model.example(gen)).backward()
        expected = reference_grad_stats(model)["head.weight"][m.GRAD_NORM]
        opt.step()
        seen.append((sample(agent, m.GRAD_NORM, layer="head.weight"), expected))
    # Steps 1-3: nothing measured yet; step 4 measured; 5-7 keep step 4's value; step 8 measured.
    assert [s for s, _ in seen[:3]] == [None] * 3
    assert seen[3][0] == pytest.approx(seen[3][1], rel=1e-5)
    assert seen[6][0] == seen[3][0]
    assert seen[7][0] == pytest.approx(seen[7][1], rel=1e-5)
    assert sample(agent, m.STEP) == 9
