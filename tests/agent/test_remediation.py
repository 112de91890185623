"""Commands from a watchdog applied between steps: LR scale vs schedulers, clipping, bounds, auth, resume."""

import time

import pytest
import torch

from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of




def trainer(model, opt, agent, scheduler=None):
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        loss = loss_of(model, model.example(gen))
        loss.backward()
        agent.observe(loss=loss)
        opt.step()
        if scheduler is not None:
            scheduler.step()

    return step


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=200),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_scale_multiplies_whatever_the_scheduler_sets(attach, watchdog, name):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9)
    scheduler, reference = SCHEDULERS[name](opt), SCHEDULERS[name](reference_opt)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))  # runs after the agent's hook
    step = trainer(model, opt, agent, scheduler)
    for _ in range(5):
        step()
    watchdog.send("test", {"action": "lower_lr", "factor": 0.5})
    ack = watchdog.wait_for_acks(1, step)[0]
    assert ack.status == "applied" and ack.lr_scale == 0.5
    for _ in range(20):
        step()
    scheduled = []
    for _ in range(len(seen)):
        scheduled.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    for i, (got, want) in enumerate(zip(seen, scheduled), start=1):
        assert got == pytest.approx(want * (0.5 if i >= ack.step else 1.0), rel=1e-12), i
    assert opt.param_groups[0]["lr"] == scheduler.get_last_lr()[0]  # between steps the scheduler owns the LR
    assert sample(agent, m.LR_SCALE) == 0.5
    assert sample(agent, m.COMMANDS_APPLIED_TOTAL, action="lower_lr") == 1


def test_lr_cuts_are_bounded_on_the_agent(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05, max_lr_cuts=2, lr_cut_cooldown_s=0)
    step = trainer(model, opt, agent)
    for _ in range(3):
        watchdog.send("test", {"action": "lower_lr", "factor": 0.1, "min_lr": 0.004})
    acks = watchdog.wait_for_acks(3, step)
    assert [a.status for a in acks] == ["applied", "applied", "refused"]
    assert "max 2" in acks[2].detail
    step()
    assert opt.param_groups[0]["lr"] == 0.1  # the scheduler's value is untouched between steps
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    step()
    assert seen == [pytest.approx(0.004)]  # 0.1 x 0.01 = 0.001 would be below min_lr


def test_restore_lr_raises_the_scale_stepwise_and_clears_the_floor_at_one(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05, lr_cut_cooldown_s=0)
    step = trainer(model, opt, agent)
    for _ in range(2):
        watchdog.send("test", {"action": "lower_lr", "factor": 0.5, "min_lr": 0.04})
    watchdog.wait_for_acks(2, step)
    for expected in (0.5, 1.0, 1.0):
        watchdog.send("test", {"action": "restore_lr", "factor": 2.0})
        ack = watchdog.wait_for_acks(len(watchdog.acks) + 1, step)[-1]
        assert (ack.status, ack.lr_scale) == ("applied", expected)
    assert agent.remedy.min_lr is None
    assert sample(agent, m.LR_SCALE) == 1.0


def test_clipping_command_clips_the_applied_update(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    watchdog.send("test", {"action": "enable_clipping", "mode": "global_norm", "threshold": 1e-3})
    watchdog.wait_for_acks(1, step)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    moved = torch.sqrt(sum((p.detach() - b).square().sum() for p, b in zip(model.parameters(), before)))
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)  # SGD lr 1: the update is the clipped gradient
    assert sample(agent, m.CLIPPING_ACTIVE) == 1 and sample(agent, m.CLIP_THRESHOLD) == 1e-3
    watchdog.send("test", {"action": "disable_clipping"})
    watchdog.wait_for_acks(2, step)
    assert sample(agent, m.CLIPPING_ACTIVE) == 0


def test_bad_signature_duplicate_and_expired_commands_are_refused(attach, watchdog, caplog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    watchdog.send("test", {"action": "lower_lr"}, secret=b"wrong")
    good = watchdog.send("test", {"action": "lower_lr"})
    watchdog.send("test", {"action": "lower_lr"}, command_id=good.command.id)  # a replay, new seq
    watchdog.send("test", {"action": "lower_lr"}, ttl=-1)
    acks = {a.status for a in watchdog.wait_for_acks(4, step)}
    assert acks == {"rejected", "applied", "duplicate", "expired"}
    assert sample(agent, m.LR_SCALE) == 0.5  # applied once
    assert "bad signature" in caplog.text


def test_stop_and_checkpoint_reach_callbacks_or_are_unsupported(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    watchdog.send("test", {"action": "checkpoint"})
    assert watchdog.wait_for_acks(1, step)[0].status == "unsupported"
    stopped = []
    agent.on_stop(stopped.append)
    watchdog.send("test", {"action": "stop"})
    ack = watchdog.wait_for_acks(2, step)[1]
    assert ack.status == "applied" and stopped == [ack.step]
    agent.close()
    deadline = time.monotonic() + 10  # the goodbye is sent in the background (close() never waits on the network)
    while not watchdog.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    instance = watchdog.registrations[0].instance
    assert instance  # signed goodbye naming this agent's instance (contract 1)
    assert watchdog.finished == [f"/api/v1/runs/test?rank=0&instance={instance}"]


def test_dead_watchdog_never_stalls_training(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watchdog.close()
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    started = time.monotonic()
    for _ in range(50):
        step()
    assert time.monotonic() - started < 5  # no step waited on the network
    assert sample(agent, m.STEP) == 50


def test_remediation_survives_resume(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    first = watchdog.send("test", {"action": "lower_lr", "factor": 0.25})
    watchdog.send("test", {"action": "enable_clipping", "mode": "clip_value", "threshold": 0.5})
    watchdog.wait_for_acks(2, step)
    state = agent.state_dict()
    agent.close()
    resumed = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    resumed.load_state_dict(state)
    assert sample(resumed, m.LR_SCALE) == 0.25 and sample(resumed, m.CLIP_THRESHOLD) == 0.5
    watchdog.send("test", {"action": "lower_lr"}, command_id=first.command.id)  # redelivered after resume
    assert watchdog.wait_for_acks(3, trainer(model, opt, resumed))[2].status == "duplicate"


def test_no_secret_means_commands_are_rejected(attach, watchdog, monkeypatch):
    monkeypatch.delenv("GRADWATCH_SECRET")
    watchdog.secret = None  # this watchdog accepts unauthenticated polls; the agent must still refuse
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    watchdog.send("test", {"action": "lower_lr"}, secret=b"anything")
    assert watchdog.wait_for_acks(1, trainer(model, opt, agent))[0].status == "rejected"
    assert sample(agent, m.LR_SCALE) == 1.0
