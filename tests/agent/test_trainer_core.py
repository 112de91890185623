"""The plain-loop core the framework adapters build on: wrapped optimizers, bad input, step(closure),
clipping handed to gradwatch, gradient accumulation, GradScaler, sparse gradients, param groups added
later, canonical layer names. Each checks exported values against a reference computed here, and the
NaN tests check the weights against a run that never saw the bad batch."""

import copy
import logging
import socket
import threading

import pytest
import torch

import gradwatch.agent
from gradwatch.agent import agent as agent_module
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of
from tests.agent.test_guard import batches, poison

torch.set_num_threads(1)


def global_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params if p.grad is not None])))


def assert_same_weights(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WrappedOptimizer:
    """What accelerate's AcceleratedOptimizer (``.optimizer``) and Lightning's LightningOptimizer
    (``._optimizer``) look like to watch(): not a torch optimizer, holding one."""

    def __init__(self, optimizer, attr: str):
        setattr(self, attr, optimizer)
        self._inner = optimizer

    def zero_grad(self):
        self._inner.zero_grad()

    def step(self, closure=None):
        return self._inner.step(closure)


# -- (a) wrapped optimizers and bad input -------------------------------------------------------


def test_bad_input_raises_naming_the_argument_before_anything_is_attached():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    port = free_port()
    with pytest.raises(ValueError, match="optimizer is None"):
        gradwatch.agent.watch(model, None, run="bad", port=port)
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer.*got dict"):
        gradwatch.agent.watch(model, {"lr": 0.1}, run="bad", port=port)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module; got NoneType"):
        gradwatch.agent.watch(None, opt, run="bad", port=port)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    gradwatch.agent.watch(model, opt, run="bad", port=port).close()  # nothing kept the port or the identity


@pytest.mark.parametrize("attr", ["optimizer", "_optimizer"])
def test_wrapped_optimizer_is_unwrapped_and_guarded(attach, attr):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt = WrappedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), attr)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1)
    for i, inputs in enumerate(batches(model, 8)):
        opt.zero_grad()
        loss_of(model, poison(inputs) if i == 4 else inputs).backward()
        opt.step()
        if i != 4:
            ref_opt.zero_grad()
            loss_of(reference, inputs).backward()
            expected = global_norm(reference.parameters())
            ref_opt.step()
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-6)
    assert_same_weights(model, reference)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1


def test_failed_watch_releases_the_port_and_threads(monkeypatch):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    port = free_port()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    before = {t.name for t in threading.enumerate()}
    monkeypatch.setattr(agent_module, "StepMonitor", broken)
    with pytest.raises(RuntimeError, match="boom"):
        gradwatch.agent.watch(model, opt, run="retry", port=port, watchdog_url="http://127.0.0.1:9")
    monkeypatch.undo()
    alive = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not {"gradwatch-metrics", "gradwatch-control"} & alive
    assert not opt._optimizer_step_pre_hooks
    agent = gradwatch.agent.watch(model, opt, run="retry", port=port)  # same port, same run, same optimizer
    assert agent.url.endswith(f":{port}/metrics")
    agent.close()


def test_two_agents_with_one_run_and_rank_are_refused(attach):
    a_model, b_model = MLP(), MLP()
    a = attach(a_model, torch.optim.SGD(a_model.parameters(), lr=0.1), run="same")
    b_opt = torch.optim.SGD(b_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"run 'same' rank 0 is already watched in this process"):
        attach(b_model, b_opt, run="same")
    assert not b_opt._optimizer_step_pre_hooks
    a.close()
    attach(b_model, b_opt, run="same")  # the identity is free once the first agent is closed


def test_monitoring_failure_is_logged_once_with_a_count(attach, caplog, monkeypatch):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=1)

    def broken(*args, **kwargs):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(agent.monitor, "_stats", broken)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for inputs in batches(model, 5):
            opt.zero_grad()
            loss_of(model, inputs).backward()
            opt.step()
    failures = [r for r in caplog.records if "monitoring failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert sample(agent, m.STEP) == 5
