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


class OptimizerSubclassWrapper(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer: a torch.optim.Optimizer subclass that never runs
    Optimizer.__init__ (no hook dicts of its own) and steps the optimizer it holds."""

    def __init__(self, optimizer):  # no super().__init__(), as AcceleratedOptimizer
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad()

    def step(self, closure=None):
        return self.optimizer.step(closure)


def lightning_optimizer(optimizer):
    module = pytest.importorskip("lightning.pytorch.core.optimizer")
    return module.LightningOptimizer(optimizer)


WRAPPERS = {
    "attribute_optimizer": lambda o: WrappedOptimizer(o, "optimizer"),
    "attribute__optimizer": lambda o: WrappedOptimizer(o, "_optimizer"),
    "optimizer_subclass": OptimizerSubclassWrapper,
    "lightning": lightning_optimizer,
}


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


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapped_optimizer_is_unwrapped_and_guarded(attach, wrapper):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = WRAPPERS[wrapper](inner)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1)
    assert len(inner._optimizer_step_pre_hooks) == 1
    step = inner.step if wrapper == "lightning" else opt.step  # LightningOptimizer.step needs a Trainer
    for i, inputs in enumerate(batches(model, 8)):
        inner.zero_grad()
        loss_of(model, poison(inputs) if i == 4 else inputs).backward()
        step()
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


# -- (b) optimizer.step(closure) ------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)])
def test_closure_step_guards_and_measures_the_gradients_it_applies(attach, make):
    """Forward and backward inside step() (Lightning's automatic optimization): the exported norm is
    this step's, and a NaN batch is skipped as if dropped."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt, ref_opt = make(model.parameters()), make(reference.parameters())
    agent = attach(model, opt, every=1)
    bad = 5
    for i, inputs in enumerate(batches(model, 10)):

        step_inputs = poison(inputs) if i == bad else inputs

        def closure(inputs=step_inputs):
            opt.zero_grad()
            loss = loss_of(model, inputs)
            loss.backward()
            agent.observe(loss=loss)
            return loss

        opt.step(closure)
        if i != bad:
            ref_opt.zero_grad()
            ref_loss = loss_of(reference, inputs)
            ref_loss.backward()
            expected = global_norm(reference.parameters())
            ref_opt.step()
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-6), i
            assert sample(agent, m.GRAD_NORM, layer="head.weight") == pytest.approx(
                float(reference.head.weight.grad.norm()), rel=1e-5
            )
            assert sample(agent, m.LOSS) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert_same_weights(model, reference)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert sample(agent, m.STEP) == 10


def test_closure_step_takes_the_keyword_form_and_clipping_applies_to_its_gradients(attach):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients stay as applied, for reading back
    attach(model, opt, every=1, max_grad_norm=1e-3)
    inputs = batches(model, 1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        return loss

    opt.step(closure=closure)
    assert global_norm(model.parameters()) == pytest.approx(1e-3, rel=1e-5)


def test_lbfgs_closure_is_guarded_at_every_evaluation(attach):
    torch.manual_seed(0)
    model = MLP(width=8, depth=2)
    reference = copy.deepcopy(model)
    make = lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=5)
    opt, ref_opt = make(model.parameters()), make(reference.parameters())
    agent = attach(model, opt, every=1)
    evaluations = []
    bad = 3
    for i, inputs in enumerate(batches(model, 6)):

        step_inputs = poison(inputs) if i == bad else inputs

        def closure(inputs=step_inputs, i=i):
            opt.zero_grad()
            loss = loss_of(model, inputs)
            loss.backward()
            evaluations.append(i)
            return loss

        def ref_closure(inputs=inputs):
            ref_opt.zero_grad()
            loss = loss_of(reference, inputs)
            loss.backward()
            return loss

        opt.step(closure)
        if i != bad:
            ref_opt.step(ref_closure)
    assert evaluations.count(bad) == 1  # the NaN evaluation ended that step at once
    assert len(evaluations) > 2 * 5  # the other steps evaluated several times, each guarded
    assert_same_weights(model, reference)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert sample(agent, m.STEP) == 6


def test_lr_scale_applies_once_to_a_closure_step(attach):
    """The scale is applied before the closure (for LBFGS) and again after this step's commands:
    never twice, and the scheduler's LR is given back after the step."""
    from gradwatch.watchdog.schema import LowerLR

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=1)
    agent.remedy.apply(LowerLR(factor=0.5))
    inputs = batches(model, 1)[0]
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, inputs)
        loss.backward()
        return loss

    opt.step(closure)
    for p, w in zip(model.parameters(), before):
        torch.testing.assert_close(p, w - 0.05 * p.grad)
    assert opt.param_groups[0]["lr"] == 0.1
    assert sample(agent, m.LEARNING_RATE, group="0") == pytest.approx(0.05)


# -- (c) clipping handed to gradwatch: max_grad_norm ----------------------------------------------


def test_max_grad_norm_exports_the_raw_norm_and_clips_as_clip_grad_norm(attach):
    """The exported norm is what clip_grad_norm_ returns (the pre-clip total), a 1000x spike included;
    the applied update is clip_grad_norm_'s."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    agent = attach(model, opt, every=1, max_grad_norm=0.01, spike_sigma=None)
    for i, inputs in enumerate(batches(model, 8)):
        scale = 1000.0 if i == 5 else 1.0
        opt.zero_grad()
        (loss_of(model, inputs) * scale).backward()
        opt.step()
        ref_opt.zero_grad()
        (loss_of(reference, inputs) * scale).backward()
        expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01))
        ref_opt.step()
        assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-5), i
        assert expected > 0.01  # every step was clipped
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # clip_grad_norm_ divides by norm + 1e-6


def test_max_grad_norm_spike_reaches_the_spike_guard_raw(attach):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, every=1, max_grad_norm=1.0)
    for i, inputs in enumerate(batches(model, 140)):
        opt.zero_grad()
        (loss_of(model, inputs) * (1000.0 if i == 135 else 1.0)).backward()
        opt.step()
    # clipping at 1.0 before step() hid this spike from the exported norms and from the spike counter
    assert sample(agent, m.SPIKE_CLIPPED_STEPS_TOTAL) == 1


def test_max_grad_norm_nan_is_attributed_to_its_own_layer(attach, caplog):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1, max_grad_norm=1.0)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for i, inputs in enumerate(batches(model, 6)):
            opt.zero_grad()
            loss_of(model, inputs).backward()
            if i == 3:
                model.layers[2].weight.grad[1, 1] = float("nan")
            opt.step()
            if i != 3:
                ref_opt.zero_grad()
                loss_of(reference, inputs).backward()
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
                ref_opt.step()
    assert "first in layer 'layers.2.weight' (nan=1, inf=0); 1 layer(s) affected" in caplog.text
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="layers.2.weight", kind="nan") == 1
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="head.weight", kind="nan") is None
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("commanded", "applied"), [(1e-3, 1e-3), (10.0, 0.5)])
def test_watchdog_clipping_applies_on_top_of_max_grad_norm_the_tighter_wins(attach, commanded, applied):
    from gradwatch.watchdog.schema import EnableClipping

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    agent = attach(model, opt, every=1, max_grad_norm=0.5)
    agent.remedy.apply(EnableClipping(mode="global_norm", threshold=commanded))
    opt.zero_grad()
    (loss_of(model, batches(model, 1)[0]) * 100).backward()
    raw = global_norm(model.parameters())
    opt.step()
    assert global_norm(model.parameters()) == pytest.approx(applied, rel=1e-5)
    assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(raw, rel=1e-6)


# -- (d) gradient accumulation --------------------------------------------------------------------


def test_accumulation_exports_the_mean_loss_of_the_steps_micro_batches(attach):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2)
    agent = attach(model, opt, every=1)
    accumulate, bad_step = 4, 2
    data = batches(model, 5 * accumulate)
    for step in range(5):
        micro = data[step * accumulate : (step + 1) * accumulate]
        opt.zero_grad()
        ref_opt.zero_grad()
        losses = []
        for k, inputs in enumerate(micro):
            loss = loss_of(model, poison(inputs) if (step, k) == (bad_step, 1) else inputs) / accumulate
            loss.backward()
            agent.observe(loss=loss * accumulate)  # the micro-batch's own loss, as a trainer logs it
            losses.append(float(loss.detach()) * accumulate)
            if step != bad_step:
                (loss_of(reference, inputs) / accumulate).backward()
        opt.step()
        if step != bad_step:
            ref_opt.step()
            assert sample(agent, m.LOSS) == pytest.approx(sum(losses) / accumulate, rel=1e-6)
            assert sample(agent, m.LOSS) != pytest.approx(losses[-1], rel=1e-3)
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(global_norm(reference.parameters()), rel=1e-6)
    assert_same_weights(model, reference)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1


# -- (e) GradScaler -------------------------------------------------------------------------------


def test_grad_scaler_skips_are_counted_and_the_loss_scale_exported(attach):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.01), torch.optim.SGD(reference.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    agent = attach(model, opt, every=1, scaler=scaler)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="amp_overflow") == 0
    overflow, nan_batch = {2, 5}, 7
    for i, inputs in enumerate(batches(model, 10)):
        opt.zero_grad()
        scale_used = scaler.get_scale()
        scaler.scale(loss_of(model, poison(inputs) if i == nan_batch else inputs)).backward()
        if i in overflow:
            model.head.weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves in the scaled gradients
        scaler.step(opt)
        scaler.update()
        if i not in overflow and i != nan_batch:
            ref_opt.zero_grad()
            loss_of(reference, inputs).backward()
            expected = global_norm(reference.parameters())
            ref_opt.step()
            assert sample(agent, m.LOSS_SCALE) == scale_used
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-5)
        assert sample(agent, m.STEP) == i + 1  # every step attempted, the scaler's skips included
    # GradScaler tells no overflow from a NaN batch: it skipped all three before the optimizer saw them
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="amp_overflow") == 3
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 0
    assert scaler.get_scale() == 2.0**8 / 8  # three halvings: two overflows and the NaN batch
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # unscaling by 2^k is exact; SGD order is not bitwise
    agent.close()
    assert "step" not in vars(scaler)  # the scaler is left as it was


def test_scaler_must_be_a_grad_scaler(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scaler must be a torch.amp.GradScaler; got str"):
        attach(model, opt, scaler="fp16")
    assert not opt._optimizer_step_pre_hooks


# -- (f) param groups added after watch() ---------------------------------------------------------


def test_param_group_added_after_watch_is_watched_guarded_and_labelled(attach, caplog):
    """The usual "unfreeze the backbone": the new group is picked up at the next step."""
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    make = lambda m_: torch.optim.Adam(m_.head.parameters(), lr=1e-2)  # noqa: E731
    opt, ref_opt = make(model), make(reference)
    agent = attach(model, opt, every=1)
    bad = 6
    with caplog.at_level(logging.INFO, logger="gradwatch.agent"):
        for i, inputs in enumerate(batches(model, 10)):
            if i == 3:
                opt.add_param_group({"params": list(model.layers.parameters()), "lr": 1e-3})
                ref_opt.add_param_group({"params": list(reference.layers.parameters()), "lr": 1e-3})
            opt.zero_grad()
            loss_of(model, inputs).backward()
            if i == bad:
                model.layers[0].weight.grad[0, 0] = float("nan")  # in the unfrozen backbone
            opt.step()
            if i != bad:
                ref_opt.zero_grad()
                loss_of(reference, inputs).backward()
                expected = global_norm(p for g in ref_opt.param_groups for p in g["params"])
                ref_opt.step()
                assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-6), i
                if i >= 3:
                    assert sample(agent, m.GRAD_NORM, layer="layers.0.weight") == pytest.approx(
                        float(reference.layers[0].weight.grad.norm()), rel=1e-5
                    )
                    assert sample(agent, m.LEARNING_RATE, group="1") == 1e-3
    assert_same_weights(model, reference)
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="layers.0.weight", kind="nan") == 1
    assert sample(agent, m.LAYER_DEPTH, layer="layers.0.weight") is not None
    added = [r.getMessage() for r in caplog.records if "param group(s) now" in r.getMessage()]
    assert len(added) == 1 and "6 new: layers.0.weight, layers.0.bias" in added[0] and "step 4" in added[0]
    depth = {layer: sample(agent, m.LAYER_DEPTH, layer=layer) for layer in ("layers.0.weight", "head.weight")}
    assert depth["layers.0.weight"] < depth["head.weight"]  # model order, not the order groups were added


# -- (g) sparse gradients -------------------------------------------------------------------------


class SparseEmbedding(torch.nn.Module):
    def __init__(self, dense_head: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 6, sparse=True)
        self.head = torch.nn.Linear(6, 1) if dense_head else None

    def forward(self, tokens):
        h = self.embed(tokens).mean(1)
        return (self.head(h) if self.head is not None else h.sum(-1, keepdim=True)).squeeze(-1)


SPARSE_CASES = {
    "sparse_adam": (False, lambda m_: torch.optim.SparseAdam(m_.parameters(), lr=1e-2)),
    "sgd_mixed": (True, lambda m_: torch.optim.SGD(m_.parameters(), lr=0.1)),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_sparse_gradients_are_guarded_and_measured(attach, caplog, case):
    dense_head, make = SPARSE_CASES[case]
    torch.manual_seed(0)
    model = SparseEmbedding(dense_head)
    reference = copy.deepcopy(model)
    opt, ref_opt = make(model), make(reference)
    agent = attach(model, opt, every=1, detail_every=1, max_grad_norm=100.0)
    gen = torch.Generator().manual_seed(1)
    bad = 4
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for i in range(8):
            tokens = torch.randint(0, 30, (4, 5), generator=gen)
            opt.zero_grad()
            loss = model(tokens).square().mean()
            (loss * float("nan") if i == bad else loss).backward()
            opt.step()
            if i == bad:
                continue
            ref_opt.zero_grad()
            reference(tokens).square().mean().backward()
            dense = reference.embed.weight.grad.to_dense()
            expected = global_norm([p for p in reference.parameters()])
            ref_opt.step()
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-5)
            assert sample(agent, m.GRAD_NORM, layer="embed.weight") == pytest.approx(float(dense.norm()), rel=1e-5)
            assert sample(agent, m.GRAD_ABS_MEAN, layer="embed.weight") == pytest.approx(float(dense.abs().mean()), rel=1e-5)
            assert sample(agent, m.GRAD_ABS_MAX, layer="embed.weight") == pytest.approx(float(dense.abs().max()), rel=1e-6)
            assert sample(agent, m.GRAD_ABS_MIN, layer="embed.weight") == float(dense.abs().min())  # rows not looked up: 0
    assert "monitoring failed" not in caplog.text
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert sample(agent, m.NONFINITE_GRADS_TOTAL, layer="embed.weight", kind="nan") > 0
    assert_same_weights(model, reference)
    # the update ratio needs a dense copy of the parameter: sparse layers are left out of it
    assert sample(agent, m.UPDATE_RATIO, layer="embed.weight") is None
    if dense_head:
        assert sample(agent, m.UPDATE_RATIO, layer="head.weight") is not None


# -- (i) canonical layer names --------------------------------------------------------------------


class Holder(torch.nn.Module):
    """A user's own submodule called ``module``: its name is kept (only wrappers' ``module`` goes)."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 1)


def labels_of(attach, model, **settings) -> list[str]:
    agent = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    labels = list(agent.layer_map.labels)
    agent.close()
    return labels


def wrappers():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def checkpointed(model):
        for i, block in enumerate(model.layers):
            if isinstance(block, torch.nn.Linear):
                model.layers[i] = checkpoint_wrapper(block)
        return model

    return {
        "data_parallel": torch.nn.DataParallel,
        "compile": torch.compile,
        "checkpoint": checkpointed,
        "compiled_data_parallel_checkpointed": lambda model: torch.compile(torch.nn.DataParallel(checkpointed(model))),
    }


@pytest.mark.parametrize("wrapper", sorted(wrappers()))
def test_layer_labels_are_the_same_wrapped_or_not(attach, wrapper):
    plain = labels_of(attach, MLP())
    wrapped_model = wrappers()[wrapper](MLP())
    assert any(n.count(".") > 2 or n.startswith(("module.", "_orig_mod.")) for n, _ in wrapped_model.named_parameters())
    assert labels_of(attach, wrapped_model) == plain
    assert labels_of(attach, MLP(), layers="module") == labels_of(attach, wrappers()[wrapper](MLP()), layers="module")


def test_layer_labels_under_ddp_match_the_plain_model(attach):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = MLP()
        plain = labels_of(attach, copy.deepcopy(model))
        assert labels_of(attach, torch.nn.parallel.DistributedDataParallel(model)) == plain
    finally:
        dist.destroy_process_group()


def test_a_users_own_module_named_module_keeps_its_name(attach):
    assert labels_of(attach, Holder()) == ["module.weight", "module.bias", "head.weight", "head.bias"]


# -- torch.compile in a plain loop ----------------------------------------------------------------


def compiled_or_skip(model):
    compiled = torch.compile(model)
    try:
        loss_of(compiled, model.example(torch.Generator().manual_seed(0))).backward()
    except Exception as exc:  # no C++ toolchain, unsupported platform: not this test's subject
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    model.zero_grad(set_to_none=True)
    return compiled


def test_compiled_model_plain_loop_is_guarded_measured_and_labelled(attach):
    torch.manual_seed(0)
    model = MLP(width=8, depth=2)
    reference = copy.deepcopy(model)
    compiled, ref_compiled = compiled_or_skip(model), compiled_or_skip(reference)
    opt, ref_opt = torch.optim.Adam(compiled.parameters(), lr=1e-2), torch.optim.Adam(ref_compiled.parameters(), lr=1e-2)
    agent = attach(compiled, opt, every=1)
    bad = 3
    for i, inputs in enumerate(batches(model, 6)):
        opt.zero_grad()
        loss = loss_of(compiled, poison(inputs) if i == bad else inputs)
        loss.backward()
        agent.observe(loss=loss)
        opt.step()
        if i != bad:
            ref_opt.zero_grad()
            ref_loss = loss_of(ref_compiled, inputs)
            ref_loss.backward()
            expected = global_norm(reference.parameters())
            ref_opt.step()
            assert sample(agent, m.GRAD_GLOBAL_NORM) == pytest.approx(expected, rel=1e-6)
            assert sample(agent, m.GRAD_NORM, layer="head.weight") == pytest.approx(float(reference.head.weight.grad.norm()), rel=1e-5)
            assert sample(agent, m.LOSS) == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    assert_same_weights(model, reference)
    assert sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") == 1
    assert "_orig_mod" not in " ".join(agent.layer_map.labels)
