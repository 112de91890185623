"""Policies → commands: escalation while a condition holds, watchdog-side bounds, acks, Alertmanager."""

import pytest

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.commands import CommandLimits, CommandRefused, CommandService
from gradwatch.watchdog.judgement import Evidence
from gradwatch.watchdog.remediation import Remediator, from_alertmanager
from gradwatch.watchdog.rules.policy import Policy, PolicyStep
from gradwatch.watchdog.schema import Ack, LowerLR, SignedCommand
from gradwatch.watchdog.store import Store

SECRET = b"s3cret"
STEPS = [
    PolicyStep.model_validate({"action": "enable_clipping", "mode": "global_norm", "threshold": "auto"}),
    PolicyStep.model_validate({"action": "lower_lr", "factor": 0.5, "after": "10s", "repeat": "30s"}),
]


@pytest.fixture
def commands(tmp_path):
    store = Store(tmp_path / "w.db")
    yield CommandService(store, SECRET, CommandLimits(max_per_run=10, cooldown_s=5))
    store.close()


def firing(rule="GradNormSpike", run="r1", fired_at=100.0, holding=True):
    return Alert(
        rule=rule, labels=(("alertname", rule), ("rank", "0"), ("run", run)), state=AlertState.FIRING,
        active_at=fired_at, fired_at=fired_at, keep_firing_since=None if holding else fired_at + 1,
    )


def actions(records):
    return [r.action for r in records]


def test_escalation_follows_the_steps_while_the_condition_holds(commands):
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)})
    alert = firing()
    assert actions(remediator.decide([alert], 100.0)) == ["enable_clipping"]
    assert remediator.decide([alert], 105.0) == []  # lower_lr only 10 s after clipping
    assert actions(remediator.decide([alert], 110.0)) == ["lower_lr"]
    assert remediator.decide([alert], 120.0) == []
    assert actions(remediator.decide([alert], 140.0)) == ["lower_lr"]  # repeats every 30 s
    quiet = firing(holding=False)  # kept firing by keep_firing_for, condition gone: no escalation
    assert remediator.decide([quiet], 200.0) == []
    kinds = [e.kind for e in commands.store.audit(run="r1")]
    assert kinds.count("command.decided") == 3


def test_a_new_episode_starts_from_the_first_step(commands):
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)})
    remediator.decide([firing(fired_at=100.0)], 100.0)
    assert actions(remediator.decide([firing(fired_at=500.0)], 500.0)) == ["enable_clipping"]


def test_rules_without_policy_and_pending_alerts_issue_nothing(commands):
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)})
    pending = firing()
    pending.state = AlertState.PENDING
    assert remediator.decide([firing(rule="VanishingGradients"), pending], 100.0) == []


def test_watchdog_bounds_cap_and_cooldown(commands):
    commands.limits = CommandLimits(max_per_run=2, cooldown_s=30)
    commands.issue("r1", LowerLR(), reason="t", now=0.0)
    with pytest.raises(CommandRefused, match="cooldown"):
        commands.issue("r1", LowerLR(), reason="t", now=10.0)
    commands.issue("r1", LowerLR(), reason="t", now=40.0)
    with pytest.raises(CommandRefused, match="max 2"):
        commands.issue("r1", LowerLR(), reason="t", now=80.0)
    commands.issue("r1", LowerLR(), reason="operator", bounded=False, now=80.0)  # manual commands skip the bounds


def test_suppressed_decisions_are_audited_once(commands):
    commands.limits = CommandLimits(max_per_run=1)
    commands.issue("r1", LowerLR(), reason="t", now=99.0)
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)})
    for now in (100.0, 102.0, 104.0):
        assert remediator.decide([firing()], now) == []
    assert [e.kind for e in commands.store.audit(run="r1")].count("command.suppressed") == 1


def test_no_secret_means_notify_only(tmp_path):
    with Store(tmp_path / "w.db") as store:
        service = CommandService(store, None)
        assert Remediator(service, lambda: {"GradNormSpike": Policy(STEPS)}).decide([firing()], 100.0) == []
        with pytest.raises(CommandRefused, match="GRADWATCH_SECRET"):
            service.issue("r1", LowerLR(), reason="t")


def test_poll_serves_signed_commands_once_delivered_and_records_acks(commands):
    first = commands.issue("r1", LowerLR(factor=0.25), reason="t", now=0.0)
    commands.issue("r2", LowerLR(), reason="t", now=0.0)
    batch = commands.poll("r1", 0, after=0, now=1.0)
    assert [c.command.id for c in batch.commands] == [first.id]
    assert batch.commands[0].verify(SECRET) and batch.commands[0].command.spec.factor == 0.25
    assert commands.poll("r1", 0, after=first.seq, now=2.0).commands == []
    assert commands.poll("r1", 0, after=0, now=1e9).commands == []  # expired
    ack = Ack(command_id=first.id, run="r1", rank=0, status="applied", step=42, at=3.0, lr_scale=0.25)
    assert commands.acknowledge("r1", [ack, ack], now=3.0) == 1
    assert commands.table.get(first.id).ack["step"] == 42
    assert commands.poll("r1", 0, after=0, now=4.0).commands == []  # done: a new trainer named r1 does not get it
    kinds = [e.kind for e in commands.store.audit(run="r1")]
    assert kinds == ["command.decided", "command.delivered", "command.acked", "command.acked"]


def test_alertmanager_alerts_map_to_commands_once_per_episode(commands):
    payload = {
        "version": "4", "status": "firing", "receiver": "gradwatch",
        "alerts": [
            {"status": "firing", "fingerprint": "abc", "startsAt": "2026-11-21T10:00:00Z",
             "labels": {"alertname": "GradNormSpike", "run": "r1", "gradwatch_action": "enable_clipping",
                        "gradwatch_mode": "clip_value", "gradwatch_threshold": "0.5"}},
            {"status": "firing", "fingerprint": "def", "labels": {"alertname": "Other", "run": "r1"}},
            {"status": "firing", "fingerprint": "ghi", "labels": {"alertname": "Bad", "run": "r1", "gradwatch_action": "fly"}},
        ],
    }
    results = [o["result"] for o in from_alertmanager(payload, commands, now=10.0)]
    assert results == ["issued", "ignored", "refused"]
    signed = SignedCommand.model_validate_json(commands.table.list(run="r1")[0].signed)
    assert signed.command.spec.mode == "clip_value" and signed.command.spec.threshold == 0.5
    assert [o["result"] for o in from_alertmanager(payload, commands, now=20.0)][0] == "duplicate"


# --- judgement before lasting action ---------------------------------------------------------

NO_HARM = Evidence(against=["loss improving: 0.60x its level before the onset"])
HARM = Evidence(harm=["loss rising"])


def test_without_evidence_of_harm_lasting_steps_are_held_back_and_audited_once(commands):
    verdict = {"evidence": NO_HARM}
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)}, judge=lambda a, now: verdict["evidence"],
                            progress=lambda run: 420)
    for now in (100.0, 102.0, 104.0):
        assert remediator.decide([firing()], now) == []
    held = commands.store.audit(run="r1", kind="command.held_back")
    assert len(held) == 1 and held[0].details["evidence"].startswith("no evidence of harm — against: loss improving")
    assert held[0].details["step"] == 420
    assert remediator.notes[("GradNormSpike", firing().fingerprint)].startswith("held back enable_clipping")
    verdict["evidence"] = HARM  # the loss turns: the same episode acts now
    assert actions(remediator.decide([firing()], 106.0)) == ["enable_clipping"]
    decided = commands.store.audit(run="r1", kind="command.decided")[0]
    assert decided.details["evidence"] == "harm: loss rising" and decided.details["step"] == 420


def test_steps_that_change_nothing_lasting_need_no_evidence_and_requires_none_skips_the_judge(commands):
    policy = Policy([
        PolicyStep.model_validate({"action": "checkpoint"}),
        PolicyStep.model_validate({"action": "lower_lr", "requires": "none", "after": "1s"}),
        PolicyStep.model_validate({"action": "stop", "after": "1s"}),
    ])
    asked = []
    remediator = Remediator(commands, lambda: {"GradNormSpike": policy}, judge=lambda a, now: asked.append(now) or NO_HARM)
    assert actions(remediator.decide([firing()], 100.0)) == ["checkpoint"]
    assert actions(remediator.decide([firing()], 101.0)) == ["lower_lr"]
    assert remediator.decide([firing()], 102.0) == [] and asked == [102.0]  # stop is lasting: judged, held back


def test_a_refused_step_falls_through_at_once_and_uses_up_no_cooldown(commands):
    steps = [
        PolicyStep.model_validate({"action": "enable_clipping", "threshold": "auto"}),
        PolicyStep.model_validate({"action": "lower_lr", "after": "30s"}),
    ]
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(steps)})
    first = remediator.decide([firing()], 100.0)[0]
    refusal = Ack(command_id=first.id, run="r1", rank=0, status="refused", step=7, at=101.0,
                  detail="threshold 'auto' needs healthy history")
    commands.acknowledge("r1", [refusal], now=101.0)
    # the LR cut does not wait 30 s behind a command that did nothing, and the audit says why
    assert actions(remediator.decide([firing()], 102.0)) == ["lower_lr"]
    decided = commands.store.audit(run="r1", kind="command.decided", newest_first=True)[0]
    assert "the previous step did not take effect (refused or expired): falling through" in decided.details["reason"]


def test_a_refused_command_counts_towards_neither_cooldown_nor_cap(commands):
    commands.limits = CommandLimits(max_per_run=1, cooldown_s=60)
    record = commands.issue("r1", LowerLR(), reason="t", now=0.0)
    commands.acknowledge("r1", [Ack(command_id=record.id, run="r1", rank=0, status="refused", at=1.0)], now=1.0)
    assert commands.issue("r1", LowerLR(), reason="t", now=2.0).action == "lower_lr"
    with pytest.raises(CommandRefused, match="max 1"):
        commands.issue("r1", LowerLR(), reason="t", now=70.0)


def test_observe_mode_decides_audits_and_notes_but_sends_nothing(commands):
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS)}, judge=lambda a, now: HARM,
                            progress=lambda run: 1234, mode="observe")
    assert remediator.decide([firing()], 100.0) == []
    assert remediator.decide([firing()], 105.0) == []
    assert remediator.decide([firing()], 110.0) == []  # the second step is due 10 s after the first: escalation goes on
    assert commands.table.list(run="r1") == []
    observed = commands.store.audit(run="r1", kind="command.observed")
    assert [e.details["spec"]["action"] for e in observed] == ["enable_clipping", "lower_lr"]
    assert observed[0].details["step"] == 1234
    note = remediator.notes[("GradNormSpike", firing().fingerprint)]
    assert note.startswith("would apply lower_lr (factor 0.5) at step 1234 (observe mode")


def test_a_rule_in_observe_mode_observes_while_the_service_enforces(commands):
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(STEPS, mode="observe")}, mode="enforce")
    assert remediator.decide([firing()], 100.0) == [] and commands.table.list(run="r1") == []
    assert len(commands.store.audit(run="r1", kind="command.observed")) == 1


def test_observe_mode_works_without_a_secret(tmp_path):
    with Store(tmp_path / "w.db") as store:
        service = CommandService(store, None)
        Remediator(service, lambda: {"GradNormSpike": Policy(STEPS)}, mode="observe").decide([firing()], 100.0)
        assert len(store.audit(run="r1", kind="command.observed")) == 1


def test_waits_may_be_given_in_optimizer_steps(commands):
    steps = [
        PolicyStep.model_validate({"action": "enable_clipping", "threshold": "auto"}),
        PolicyStep.model_validate({"action": "lower_lr", "after": "50 steps", "repeat": "100 steps"}),
    ]
    run_step = {"step": 1000}
    remediator = Remediator(commands, lambda: {"GradNormSpike": Policy(steps)}, progress=lambda run: run_step["step"])
    assert actions(remediator.decide([firing()], 100.0)) == ["enable_clipping"]
    commands.poll("r1", 0, after=0, now=101.0)  # delivered: a command that expired unread would fall through
    run_step["step"] = 1049
    assert remediator.decide([firing()], 500.0) == []  # minutes later, but only 49 steps
    run_step["step"] = 1050
    assert actions(remediator.decide([firing()], 501.0)) == ["lower_lr"]
    commands.poll("r1", 0, after=0, now=502.0)
    run_step["step"] = 1149
    assert remediator.decide([firing()], 900.0) == []
    run_step["step"] = 1150
    assert actions(remediator.decide([firing()], 901.0)) == ["lower_lr"]


def test_an_alertmanager_alert_is_judged_like_a_policy_step(commands):
    payload = {"alerts": [{
        "status": "firing", "fingerprint": "abc", "startsAt": "2026-11-21T10:00:00.123456789Z",
        "labels": {"alertname": "GradNormSpike", "run": "r1", "rank": "0", "gradwatch_action": "lower_lr"},
    }]}
    onsets = []
    judged = from_alertmanager(payload, commands, now=10.0, judge=lambda a, now: onsets.append(a.active_at) or NO_HARM)
    assert judged[0]["result"] == "held_back" and "loss improving" in judged[0]["reason"]
    assert onsets == [pytest.approx(1795255200.123456)]
    observed = from_alertmanager(payload, commands, now=11.0, judge=lambda a, now: HARM, mode="observe")
    assert observed[0]["result"] == "observed" and commands.table.list(run="r1") == []
    assert from_alertmanager(payload, commands, now=12.0, judge=lambda a, now: HARM)[0]["result"] == "issued"
