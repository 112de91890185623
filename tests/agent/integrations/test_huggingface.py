"""The Hugging Face Trainer adapter with the real Trainer: a tiny Llama built from a config, generated tokens.

Each run checks gradwatch's exported values against what the Trainer itself logs (grad_norm, loss,
learning_rate) and against the gradients the optimizer actually applied.
"""

import json
import math

import pytest
import torch
from torch.utils.data import IterableDataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from gradwatch.agent.integrations.huggingface import GradwatchTrainerCallback
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.integrations.conftest import global_norm, send

VOCAB, SEQ, HIDDEN, BATCH, ACCUM = 64, 8, 16, 2, 4


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


class Stream(IterableDataset):
    """Samples in a fixed order (no sampler), so a run with some steps' samples left out is exactly comparable."""

    def __init__(self, steps: int, poison_step: int | None = None, drop_step: int | None = None):
        gen = torch.Generator().manual_seed(1)
        self.items = []
        for step in range(1, steps + 1):
            for _ in range(BATCH * ACCUM):
                ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
                labels = torch.where(torch.rand(SEQ, generator=gen) < 0.4, -100, ids)  # uneven token counts
                if step != drop_step:
                    self.items.append({"input_ids": ids, "labels": labels, "poison": step == poison_step})

    def __iter__(self):
        return iter(self.items)


def collate(features):
    batch = {key: torch.stack([f[key] for f in features]) for key in ("input_ids", "labels")}
    if any(f["poison"] for f in features):  # a NaN batch: its embeddings are NaN
        del batch["input_ids"]
        batch["inputs_embeds"] = torch.full((len(features), SEQ, HIDDEN), float("nan"))
    return batch


def arguments(tmp_path, steps: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(TrainerCallback):
    """Listed after gradwatch's callback: its optimizer hooks run after the agent's, so they see
    the LR and the gradients the step applies; reads the agent's exported values after each step."""

    def __init__(self, gw: GradwatchTrainerCallback, before_step=None):
        self.gw = gw
        self.before_step = before_step
        self.applied: list[float] = []  # global norm of the gradients each step applied
        self.lrs: list[float] = []  # the LR each step applied
        self.exported: list[dict] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        inner.register_step_pre_hook(lambda o, a, k: self.lrs.append(float(o.param_groups[0]["lr"])))
        inner.register_step_post_hook(lambda o, a, k: self.applied.append(global_norm(params)))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before_step is not None:
            self.before_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        agent = self.gw.agent
        self.exported.append({
            "step": state.global_step,
            "norm": sample(agent, m.GRAD_GLOBAL_NORM),
            "loss": sample(agent, m.LOSS),
            "skipped": sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") or 0,
        })


def train(tmp_path, steps, dataset, callbacks, **overrides) -> Trainer:
    trainer = Trainer(
        model=tiny_llama(), args=arguments(tmp_path, steps, **overrides), train_dataset=dataset,
        data_collator=collate, callbacks=callbacks,
    )
    trainer.train()
    return trainer


def logged(trainer: Trainer) -> dict[int, dict]:
    return {row["step"]: row for row in trainer.state.log_history if "grad_norm" in row}


def bf16_on_cpu_or_skip():
    try:
        arguments("/tmp/unused", 1, bf16=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (ValueError, RuntimeError) as exc:
        pytest.skip(f"bf16 on CPU not supported here: {exc}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exported_values_are_what_the_trainer_logs_with_its_clipping_handed_over(tmp_path, precision):
    overrides = {}
    if precision == "bf16":
        bf16_on_cpu_or_skip()
        overrides["bf16"] = True
    gw = GradwatchTrainerCallback(run="hf", port=0, every=1)
    recorder = Recorder(gw)
    trainer = train(tmp_path, 6, Stream(6), [gw, recorder], **overrides)  # default max_grad_norm=1.0, accumulation 4
    logs = logged(trainer)
    assert trainer.args.max_grad_norm == 1.0  # given back after train()
    assert len(recorder.exported) == len(logs) == 6
    clipped = 0
    for row, applied in zip(recorder.exported, recorder.applied):
        log = logs[row["step"]]
        # pre-clip norm, as the Trainer logs it; the loss not divided by the accumulation count
        assert row["norm"] == pytest.approx(log["grad_norm"], rel=1e-5), row
        assert row["loss"] == pytest.approx(log["loss"], rel=1e-5), row
        # the Trainer's own clipping, now done by gradwatch after measuring
        assert applied == pytest.approx(min(log["grad_norm"], 1.0), rel=1e-5), row
        clipped += log["grad_norm"] > 1.0
    assert clipped > 0  # the hand-over was exercised: some steps were above max_grad_norm
    assert gw.agent is None  # detached at on_train_end


def test_nan_batch_step_is_skipped_and_equals_the_run_without_it(tmp_path):
    gw = GradwatchTrainerCallback(run="hf", port=0, every=1)
    recorder = Recorder(gw)
    poisoned = train(tmp_path / "a", 6, Stream(6, poison_step=3), [gw, recorder])
    # the reference is watched too, so both runs clip with the same arithmetic (gradwatch's, not clip_grad_norm_'s)
    reference = train(tmp_path / "b", 5, Stream(6, drop_step=3), [GradwatchTrainerCallback(run="ref", port=0)])
    assert [row["skipped"] for row in recorder.exported] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(logged(poisoned)[3]["grad_norm"])
    for (name, p), q in zip(poisoned.model.named_parameters(), reference.model.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name


def test_watchdog_clipping_and_lr_cut_take_effect_and_the_trainer_logs_the_applied_lr(tmp_path, watchdog):
    gw = GradwatchTrainerCallback(run="hf", port=0, every=1, watchdog_url=watchdog.url, poll_interval_s=0.05)
    recorder = Recorder(gw, before_step=lambda step: step == 3 and send(watchdog, gw.agent, [
        {"action": "enable_clipping", "mode": "global_norm", "threshold": 1e-3},
        {"action": "lower_lr", "factor": 0.5},
    ]))
    trainer = train(tmp_path, 5, Stream(5), [gw, recorder])
    logs = logged(trainer)
    acks = {a.command_id: a for a in watchdog.acks}
    assert {a.status for a in acks.values()} == {"applied"} and {a.step for a in acks.values()} == {3}
    for step, (row, applied, lr) in enumerate(zip(recorder.exported, recorder.applied, recorder.lrs), start=1):
        log = logs[step]
        assert row["norm"] == pytest.approx(log["grad_norm"], rel=1e-5)  # still the raw norm
        assert applied == pytest.approx(min(log["grad_norm"], 1.0 if step < 3 else 1e-3), rel=1e-4), step
        assert lr == pytest.approx(1e-2 if step < 3 else 5e-3), step
        assert log["learning_rate"] == pytest.approx(lr, rel=1e-12), step  # the LR the step applied, not 2x


@pytest.mark.parametrize("restore_callbacks", [False, True], ids=["default", "restore_callback_states"])
def test_agent_state_rides_in_the_trainer_checkpoint_and_resumes(tmp_path, watchdog, restore_callbacks):
    first = GradwatchTrainerCallback(run="hf", port=0, watchdog_url=watchdog.url, poll_interval_s=0.05)
    recorder = Recorder(first, before_step=lambda step: step == 2 and send(watchdog, first.agent, [
        {"action": "lower_lr", "factor": 0.5},
    ]))
    train(tmp_path, 4, Stream(6), [first, recorder], save_strategy="steps", save_steps=4)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GradwatchTrainerCallback"]["attributes"]["agent_state"]["step"] == 4
    # the arguments saved with the checkpoint are the user's: the hand-over of max_grad_norm does not leak into them
    assert torch.load(tmp_path / "checkpoint-4" / "training_args.bin", weights_only=False).max_grad_norm == 1.0

    steps = []

    class Probe(TrainerCallback):  # finds the attached callback: with restore_callback_states the Trainer rebuilds it
        def on_step_begin(self, args, state, control, **kwargs):
            gw = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradwatchTrainerCallback))
            steps.append((gw.agent.step, sample(gw.agent, m.LR_SCALE)))

    trainer = Trainer(
        model=tiny_llama(), args=arguments(tmp_path, 6, restore_callback_states_from_checkpoint=restore_callbacks),
        train_dataset=Stream(6), data_collator=collate, callbacks=[GradwatchTrainerCallback(run="hf", port=0), Probe()],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert steps[0] == (4, 0.5)  # the step count and the LR cut carried over
    assert logged(trainer)[5]["learning_rate"] == pytest.approx(5e-3)


def test_stop_and_checkpoint_commands_use_the_trainers_controls(tmp_path, watchdog):
    gw = GradwatchTrainerCallback(run="hf", port=0, watchdog_url=watchdog.url, poll_interval_s=0.05)
    recorder = Recorder(gw, before_step=lambda step: step == 2 and send(watchdog, gw.agent, [
        {"action": "checkpoint"}, {"action": "stop"},
    ]))
    trainer = train(tmp_path, 6, Stream(6), [gw, recorder])
    assert trainer.state.global_step == 2  # stopped gracefully after the step the commands arrived at
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    assert {a.status for a in watchdog.acks} == {"applied"}


def test_a_micro_batch_the_agent_asks_to_skip_drops_its_optimizer_step(tmp_path):
    """The hook point for rollback's skipped batches: ``agent.should_skip()`` is asked once per
    micro-batch; a skipped one drops the optimizer step it belongs to (all its micro-batches)."""
    gw = GradwatchTrainerCallback(run="hf", port=0)
    asked = []

    class Skipper(TrainerCallback):  # stands in for the agent's own should_skip(): the 10th micro-batch
        def on_train_begin(self, args, state, control, **kwargs):
            gw.agent.should_skip = lambda: asked.append(len(asked)) or len(asked) == 10

    skipping = train(tmp_path / "a", 6, Stream(6), [gw, Skipper()])
    reference = train(tmp_path / "b", 5, Stream(6, drop_step=3), [GradwatchTrainerCallback(run="ref", port=0)])
    assert len(asked) == 6 * ACCUM
    for (name, p), q in zip(skipping.model.named_parameters(), reference.model.parameters()):
        assert torch.equal(p, q), name
