"""Snapshots and the `rollback` command inside the trainer: bit-identical restore, skipped batches,
the budget, the floor, the memory budget, and delegation to the user's own checkpoints."""

import copy
import re

import gradwatch.agent
import pytest
import torch

from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of




class Loop:
    """A plain training loop over numbered batches that goes through agent.skipping()."""

    def __init__(self, agent, model, opt, scheduler=None):
        self.agent, self.model, self.opt, self.scheduler = agent, model, opt, scheduler
        self.trained: list[int] = []  # batch numbers the loop trained on
        self.rolled_back: list[tuple[int, dict]] = []  # (step restored, the state right after the rollback step)
        self.batches = self.agent.skipping(iter(range(10**6)))
        self.saved: dict[int, dict] = {}  # step -> the state right after its update (as the snapshot sees it)
        self.save_at: set[int] = set()

    def step(self):
        index = next(self.batches)
        self.trained.append(index)
        gen = torch.Generator().manual_seed(index)
        self.opt.zero_grad()
        loss = loss_of(self.model, self.model.example(gen))
        loss.backward()
        self.agent.observe(loss=loss)
        before = self.agent.step
        self.opt.step()
        if self.agent.step <= before:  # a rollback replaced this step
            self.rolled_back.append((self.agent.step, state_of(self.model, self.opt, self.scheduler)))
        elif self.agent.step in self.save_at:
            self.saved[self.agent.step] = state_of(self.model, self.opt, self.scheduler)
        if self.scheduler is not None:
            self.scheduler.step()

    def run_to(self, step: int):
        while self.agent.step < step:
            self.step()


def state_of(model, opt, scheduler=None) -> dict:
    return copy.deepcopy({
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": torch.get_rng_state(),
    })


def assert_identical(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where  # bit for bit (NaN-free states here)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def build(attach, watchdog, **snapshots):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.05 * s))
    settings = {"every": 5, "keep": 3, "include": [scheduler], **snapshots}
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.02, snapshots=settings)
    return agent, Loop(agent, model, opt, scheduler)


def rollback(watchdog, loop, n_acks, **spec):
    watchdog.send("test", {"action": "rollback", **spec})
    return watchdog.wait_for_acks(n_acks, loop.step)[n_acks - 1]


def test_the_restored_state_is_bit_identical_to_the_one_saved(attach, watchdog):
    agent, loop = build(attach, watchdog)
    loop.save_at = {10}  # after the update of step 10, before the loop's scheduler step: when the snapshot is taken
    loop.run_to(13)
    saved = loop.saved[10]
    assert agent.rollbacks.ring.steps == [5, 10]
    ack = rollback(watchdog, loop, 1, before_step=13)  # however many steps the command takes to arrive
    assert ack.status == "applied" and ack.restored_step == 10, ack
    (restored, state), = loop.rolled_back
    assert restored == 10
    assert_identical(saved, state)
    assert sample(agent, "gradwatch_skipped_steps_total", reason="rollback") == 1
    assert sample(agent, "gradwatch_commands_applied_total", action="rollback") == 1


def test_skipped_batches_are_exactly_the_ones_named(attach, watchdog):
    agent, loop = build(attach, watchdog)
    loop.run_to(12)
    ack = rollback(watchdog, loop, 1, skip_batches=4, lr_scale=0.5)
    first, last = map(int, re.search(r"skipping batches (\d+)-(\d+)", ack.detail).groups())
    assert last - first + 1 == 4
    (rollback_batch, _), = [(b, None) for b in loop.trained if b == first - 1]  # the rollback step's batch
    loop.run_to(agent.step + 10)
    never_trained = set(range(max(loop.trained) + 1)) - set(loop.trained)
    assert never_trained == set(range(first, last + 1))
    assert loop.trained[loop.trained.index(rollback_batch) + 1] == last + 1  # right after the rollback's batch
    assert agent.remedy.lr_scale == 0.5 and ack.lr_scale == 0.5


def test_the_budget_and_the_previous_target_bound_rollbacks(attach, watchdog):
    _, loop = build(attach, watchdog, max_rollbacks=2, keep=4)
    loop.run_to(21)
    assert rollback(watchdog, loop, 1).restored_step == 20
    # Never before the previous rollback's target: asking for a state before step 15 is refused.
    refused = rollback(watchdog, loop, 2, before_step=15)
    assert refused.status == "refused" and "previous rollback's target 20" in refused.detail
    assert rollback(watchdog, loop, 3, before_step=22).restored_step == 20  # the same target again is allowed
    loop.run_to(23)
    spent = rollback(watchdog, loop, 4)
    assert spent.status == "refused" and "rollback budget spent: 2 rollbacks" in spent.detail


def test_no_snapshot_is_taken_while_the_guard_holds_steps(attach, watchdog):
    agent, loop = build(attach, watchdog)
    loop.run_to(4)
    grads = []
    hook = loop.model.head.weight.register_hook(lambda g: g * float("nan") if agent.step == 4 else g)
    loop.run_to(12)  # step 5 gets NaN gradients: skipped, so no snapshot at 5; steps 6-10 are clean
    hook.remove()
    assert sample(agent, "gradwatch_skipped_steps_total", reason="nonfinite") == 1
    assert agent.rollbacks.ring.steps == [10]
    del grads


def test_no_snapshot_is_taken_after_a_norm_10x_the_recent_median_the_guard_let_through(attach, watchdog):
    agent, loop = build(attach, watchdog)
    loop.run_to(13)
    # 1000x at step 14: inside the spike guard's warm-up (no bound for 128 steps), so not held by it.
    hook = loop.model.head.weight.register_hook(lambda g: g * 1000.0 if agent.step == 13 else g)
    loop.run_to(21)
    hook.remove()
    assert sample(agent, "gradwatch_spike_clipped_steps_total") == 0
    assert agent.rollbacks.ring.steps == [5, 10, 20]  # no state saved at 15: step 14 was in its window
    assert agent.rollbacks.held_step == 14


def test_a_budget_that_cannot_hold_one_snapshot_is_refused_at_attach():
    model = MLP()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"snapshots.max_bytes = 1,000 cannot hold one snapshot of about"):
        gradwatch.agent.watch(model, opt, run="test", port=0, snapshots={"max_bytes": 1000})
    with pytest.raises(ValueError, match=r"snapshots.include: .*include\[0\] \(object\) has no state_dict"):
        gradwatch.agent.watch(model, opt, run="test", port=0, snapshots={"include": [object()]})
    gradwatch.agent.watch(model, opt, run="test", port=0).close()  # nothing was left attached


def test_the_budget_check_counts_the_optimizer_state_to_come():
    model = MLP()
    params = sum(p.numel() * 4 for p in model.parameters())
    agent = gradwatch.agent.watch(model, torch.optim.Adam(model.parameters()), run="test", port=0,
                                  snapshots={"max_bytes": 3 * params * 2, "keep": 4})
    assert agent.rollbacks.ring.estimate == 3 * params and agent.rollbacks.ring.keep == 2
    agent.close()


def test_without_snapshots_the_users_checkpoint_callback_is_used(attach, watchdog):
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.02)
    loop = Loop(agent, model, opt)
    checkpoints = {}
    asked = []

    def load(at_most):
        asked.append(at_most)
        step = max(s for s in checkpoints if s <= at_most)
        model.load_state_dict(checkpoints[step])
        return step

    agent.on_rollback(load)
    for step in (3, 6):
        loop.run_to(step)
        checkpoints[step] = copy.deepcopy(model.state_dict())
    loop.run_to(8)
    ack = rollback(watchdog, loop, 1, before_step=7)
    assert ack.status == "applied" and ack.restored_step == 6 and asked == [6]
    (restored, state), = loop.rolled_back
    assert restored == 6
    assert_identical(checkpoints[6], state["model"])


def test_rollback_without_snapshots_or_callback_is_refused_and_training_goes_on(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.02)
    loop = Loop(agent, model, opt)
    ack = rollback(watchdog, loop, 1)
    assert ack.status == "refused" and "no snapshots" in ack.detail and loop.rolled_back == []


def test_the_spent_budget_and_the_floor_survive_a_resume(attach, watchdog):
    agent, loop = build(attach, watchdog, max_rollbacks=1)
    loop.run_to(12)
    assert rollback(watchdog, loop, 1, before_step=12).restored_step == 10
    state, spent = agent.state_dict(), agent.rollbacks.state_dict()
    agent.close()  # a resume is a new process: one live agent per run and rank
    resumed, _ = build(attach, watchdog, max_rollbacks=1)
    resumed.load_state_dict(state)
    assert resumed.rollbacks.floor == 10 and resumed.rollbacks.state_dict() == spent
