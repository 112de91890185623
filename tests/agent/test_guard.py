"""The step guard: a non-finite step is skipped, leaving parameters and optimizer state untouched."""

import copy
import logging

import pytest
import torch

import gradwatch.agent
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, SeqModel, WithEmptyParameter, loss_of

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def batches(model, n: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [model.example(gen) for _ in range(n)]


def poison(inputs):
    x = inputs[0].clone()
    x[0] = float("nan")
    return (x,)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("every", [1, 5])  # sampled and unsampled steps take different guard paths
@pytest.mark.parametrize("spike_sigma", [6.0, None])  # with and without the spike guard beside it
def test_nan_batch_is_skipped_as_if_dropped(attach, name, every, spike_sigma):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = OPTIMIZERS[name](model.parameters())
    ref_opt = OPTIMIZERS[name](reference.parameters())
    agent = attach(model, opt, every=every, spike_sigma=spike_sigma)
    data = batches(model, 12)
    bad = 6

    for i, inputs in enumerate(data):
        opt.zero_grad()
        loss_of(model, poison(inputs) if i == bad else inputs).backward()
        opt.step()
        if i != bad:  # the reference run never sees the bad batch
            ref_opt.zero_grad()
            loss_of(reference, inputs).backward()
            ref_opt.step()

    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), reference.parameters()):  # optimizer state too (Adam moments, step)
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert sample(agent, m.STEP) == 12


def test_skip_clears_gradients_counts_layers_and_names_the_first(attach, caplog):
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    agent = attach(model, opt, every=100)
    loss_of(model, batches(model, 1)[0]).backward()
    model.layers[2].weight.grad[0, :3] = float("nan")
    model.head.weight.grad[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert opt.state == {} or all(not s for s in opt.state.values())
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="layers.2.weight", kind="nan") == 3
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="head.weight", kind="inf") == 1
    assert "first in layer 'layers.2.weight'" in caplog.text


def test_grad_scaler_skip_is_not_double_counted(attach):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    agent = attach(model, opt, every=1)
    data = batches(model, 4)
    for i, inputs in enumerate(data):
        opt.zero_grad()
        scaler.scale(loss_of(model, inputs)).backward()
        if i == 2:
            model.head.weight.grad[0, 0] = float("inf")
        scaler.step(opt)  # GradScaler finds the inf itself and never calls optimizer.step()
        scaler.update()
    assert scaler.get_scale() < 2.0**8  # the scaler did skip
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 0
    assert sample(agent, m.STEP) == 3  # the agent counts optimizer steps that actually ran
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_continues_after_nan_batch_with_finite_loss(attach):
    torch.manual_seed(0)
    model = SeqModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = attach(model, opt, every=10)
    losses = []
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        inputs = model.example(gen)
        opt.zero_grad()
        loss = loss_of(model, inputs)
        if i == 20:
            loss = loss * float("nan")
        loss.backward()
        agent.observe(loss=loss)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert losses[-1] == losses[-1] and losses[-1] < losses[0]


def test_guard_off_applies_nonfinite_steps(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    attach(model, opt, guard=False, every=100)
    loss_of(model, batches(model, 1)[0]).backward()
    model.head.weight.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(model.head.weight).any()  # what happens without gradwatch's guard


def test_parameter_without_elements_is_left_unwatched(attach, caplog):
    torch.manual_seed(0)
    model = WithEmptyParameter()
    reference = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1, detail_every=1)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for i, inputs in enumerate(batches(model, 6)):
            opt.zero_grad()
            loss_of(model, poison(inputs) if i == 3 else inputs).backward()
            opt.step()
            if i != 3:
                ref_opt.zero_grad()
                loss_of(reference, inputs).backward()
                ref_opt.step()
    assert "monitoring failed" not in caplog.text  # statistics and guard ran on every step
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert sample(agent, m.GRAD_NORM, layer="head.weight") is not None
    assert sample(agent, m.GRAD_NORM, layer="empty") is None
    for p, q in zip(model.parameters(), reference.parameters()):  # the skip left even the empty one's Adam step count
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_model_of_only_empty_parameters_is_refused():
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(3, 0))])
    with pytest.raises(ValueError, match="zero elements"):
        gradwatch.agent.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run="t", port=0)
