"""Undo: what a policy changed is taken back stepwise once the run is healthy, and never oscillates."""

import pytest

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandLimits, CommandService
from gradwatch.watchdog.durations import Span
from gradwatch.watchdog.judgement import Evidence
from gradwatch.watchdog.restore import RESTORE_RULE, Restorer, pin
from gradwatch.watchdog.rules.policy import Policy, PolicyStep
from gradwatch.watchdog.schema import Ack, EnableClipping, LowerLR, SignedCommand
from gradwatch.watchdog.store import Store

SECRET = b"s3cret"
POLICIES = {"GradNormSpike": Policy([PolicyStep.model_validate({"action": "lower_lr"})])}


@pytest.fixture
def commands(tmp_path):
    store = Store(tmp_path / "w.db")
    yield CommandService(store, SECRET, CommandLimits(max_per_run=100, cooldown_s=0))
    store.close()


class Run:
    """The trainer's side: applies what it is sent, as the agent would, and acknowledges it."""

    def __init__(self, commands):
        self.commands = commands
        self.lr_scale, self.clipping = 1.0, None
        self.verdict = Evidence()
        self.step = 0

    def apply(self, record, now, status="applied"):
        spec = SignedCommand.model_validate_json(record.signed).command.spec
        action = spec.action
        if status == "applied":
            if action == "lower_lr":
                self.lr_scale *= spec.factor
            elif action == "restore_lr":
                self.lr_scale = min(1.0, self.lr_scale * spec.factor) if spec.factor else 1.0
            elif action == "enable_clipping":
                self.clipping = "global_norm"
            elif action == "disable_clipping":
                self.clipping = None
        ack = Ack(command_id=record.id, run="r1", rank=0, status=status, step=self.step, at=now,
                  lr_scale=self.lr_scale, clipping=self.clipping)
        self.commands.acknowledge("r1", [ack], now=now)


def restorer(commands, run, after=Span(seconds=60.0), mode="enforce"):
    return Restorer(commands, lambda: POLICIES, runs=lambda: ["r1"], healthy=lambda r, start, now: run.verdict,
                    progress=lambda r: run.step, restore_after=after, mode=mode)


def alert(state=AlertState.FIRING, fired_at=0.0):
    return Alert(rule="GradNormSpike", labels=(("alertname", "GradNormSpike"), ("rank", "0"), ("run", "r1")),
                 state=state, active_at=fired_at, fired_at=fired_at)


def incident(commands, run, now=0.0):
    """A policy's clipping and two LR cuts, applied."""
    for spec in (EnableClipping(threshold=1.0), LowerLR(), LowerLR()):
        run.apply(commands.issue("r1", spec, reason="GradNormSpike firing", rule="GradNormSpike", now=now), now)


def restore_actions(r, run, times, alerts=()):
    out = []
    for now in times:
        for record in r.decide(list(alerts), now):
            out.append((now, record.action))
            run.apply(record, now)
    return out


def test_the_lr_comes_back_x2_per_step_then_clipping_is_disabled(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run)
    done = restore_actions(r, run, [t * 10.0 for t in range(1, 30)])
    assert done == [(60.0, "restore_lr"), (120.0, "restore_lr"), (180.0, "disable_clipping")]
    assert (run.lr_scale, run.clipping) == (1.0, None)
    restores = [SignedCommand.model_validate_json(c.signed).command for c in commands.table.list(run="r1", rule=RESTORE_RULE)]
    assert [c.spec.model_dump() for c in restores][1:] == [{"action": "restore_lr", "factor": 2.0}] * 2
    assert all("healthy for 1m" in c.reason for c in restores)


def test_nothing_is_restored_while_a_remediating_alert_is_active_or_the_run_is_not_healthy(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run)
    assert restore_actions(r, run, [100.0, 200.0], alerts=[alert()]) == []
    run.verdict = Evidence(harm=["loss rising"])
    assert restore_actions(r, run, [300.0]) == []  # quiet since 200, but not healthy: the window starts again
    run.verdict = Evidence()
    assert restore_actions(r, run, [330.0]) == []
    assert restore_actions(r, run, [361.0]) == [(361.0, "restore_lr")]


def test_a_problem_that_returns_during_restoration_stops_it_for_the_incident(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run)
    assert restore_actions(r, run, [60.0]) == [(60.0, "restore_lr")]
    # the explosion comes back at half the LR: the policy cuts again, the restorer gives up on this incident
    again = alert(fired_at=90.0)
    run.apply(commands.issue("r1", LowerLR(), reason="again", rule="GradNormSpike", now=90.0), 90.0)
    assert restore_actions(r, run, [92.0], alerts=[again]) == []
    assert len(commands.store.audit(run="r1", kind="remediation.restore_abandoned")) == 1
    assert restore_actions(r, run, [t * 60.0 for t in range(2, 20)]) == []  # no oscillation
    assert run.lr_scale == 0.25


def test_a_pinned_run_keeps_its_remediation_until_released(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run)
    pin(commands, "r1", True, "investigating", now=1.0)
    assert restore_actions(r, run, [100.0, 200.0]) == []
    pin(commands, "r1", False, "done", now=201.0)
    assert restore_actions(r, run, [260.0]) == [(260.0, "restore_lr")]


def test_what_an_operator_commanded_is_left_alone(commands):
    run = Run(commands)
    incident(commands, run)
    run.apply(commands.issue("r1", LowerLR(), reason="operator", bounded=False, now=5.0), 5.0)
    assert restore_actions(restorer(commands, run), run, [100.0, 200.0]) == []


def test_an_operators_clipping_stays_while_the_policys_lr_cut_is_undone(commands):
    run = Run(commands)
    run.apply(commands.issue("r1", EnableClipping(threshold=2.0), reason="operator", bounded=False, now=0.0), 0.0)
    run.apply(commands.issue("r1", LowerLR(), reason="GradNormSpike firing", rule="GradNormSpike", now=1.0), 1.0)
    done = restore_actions(restorer(commands, run), run, [t * 30.0 for t in range(1, 12)])
    assert done == [(90.0, "restore_lr")] and run.clipping == "global_norm"


def test_a_refused_policy_command_leaves_nothing_to_restore(commands):
    run = Run(commands)
    run.apply(commands.issue("r1", LowerLR(), reason="x", rule="GradNormSpike", now=0.0), 0.0, status="refused")
    assert restore_actions(restorer(commands, run), run, [100.0, 200.0]) == []


def test_restore_windows_may_be_given_in_steps(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run, after=Span(steps=500))
    run.step = 100
    assert restore_actions(r, run, [10.0]) == []  # the window starts at step 100
    run.step = 599
    assert restore_actions(r, run, [5000.0]) == []
    run.step = 600
    assert restore_actions(r, run, [5001.0]) == [(5001.0, "restore_lr")]


def test_observe_mode_only_audits_what_it_would_restore(commands):
    run = Run(commands)
    incident(commands, run)
    r = restorer(commands, run, mode="observe")
    assert restore_actions(r, run, [10.0, 100.0]) == []
    observed = commands.store.audit(run="r1", kind="restore.observed")
    assert [e.details["spec"]["action"] for e in observed] == ["restore_lr"]
