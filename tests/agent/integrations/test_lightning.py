"""The Lightning adapter with the real Trainer: automatic optimization (the closure inside
optimizer.step, gradient_clip_val, accumulate_grad_batches) and manual optimization.

The reference norm is Lightning's own grad-norm logging (``utilities.grad_norm`` in
``on_before_optimizer_step``, before Lightning would clip); the applied gradients are read
in an optimizer post-hook.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.utilities import grad_norm

from gradwatch.agent.integrations.lightning import GradwatchCallback
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.integrations.conftest import global_norm, send
from tests.agent.models import MLP

BATCH = 8


class Regressor(pl.LightningModule):
    def __init__(self, manual: bool = False, lr: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.net = MLP()
        self.lr = lr
        self.automatic_optimization = not manual
        self.losses: list[float] = []  # every training_step's loss
        self.reference_norms: list[float] = []  # Lightning's grad-norm logging, before any clipping

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def on_before_optimizer_step(self, optimizer):
        norms = grad_norm(self, norm_type=2)
        self.reference_norms.append(norms["grad_2.0_norm_total"].item() if norms else 0.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(batches: int, poison: int | None = None, drop: tuple[int, ...] = ()) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batches * BATCH, 16, generator=gen) * 3
    y = torch.randn(batches * BATCH, generator=gen) * 3
    if poison is not None:
        x[poison * BATCH] = float("nan")
    keep = [i for i in range(batches * BATCH) if i // BATCH not in drop]
    return DataLoader(TensorDataset(x[keep], y[keep]), batch_size=BATCH, shuffle=False)


class Recorder(pl.Callback):
    """After gradwatch's callback: reads the exported values after every optimizer step and the
    norm of the gradients each step applied (post-hook: the gradients are still there)."""

    def __init__(self, gw: GradwatchCallback, before_batch=None):
        self.gw = gw
        self.before_batch = before_batch
        self.applied: list[float] = []
        self.exported: list[dict] = []

    def on_fit_start(self, trainer, pl_module):
        params = list(pl_module.parameters())
        trainer.optimizers[0].register_step_post_hook(lambda o, a, k: self.applied.append(global_norm(params)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before_batch is not None:
            self.before_batch(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        agent = self.gw.agent
        if len(self.exported) < agent.step:
            self.exported.append({
                "norm": sample(agent, m.GRAD_GLOBAL_NORM),
                "loss": sample(agent, m.LOSS),
                "skipped": sample(agent, m.SKIPPED_STEPS_TOTAL, reason="nonfinite") or 0,
                "amp_overflow": sample(agent, m.SKIPPED_STEPS_TOTAL, reason="amp_overflow") or 0,
            })


def fit(module, loader, callbacks, tmp_path, ckpt_path=None, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=1, default_root_dir=str(tmp_path), callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_automatic_optimization_measures_the_closures_gradients_and_takes_over_clipping(tmp_path):
    module = Regressor()
    gw = GradwatchCallback(run="pl", port=0, every=1)
    recorder = Recorder(gw)
    trainer = fit(module, data(12), [gw, recorder], tmp_path, gradient_clip_val=0.5, accumulate_grad_batches=2)
    assert trainer.gradient_clip_val == 0.5  # given back at teardown
    assert len(recorder.exported) == len(module.reference_norms) == len(recorder.applied) == 6
    clipped = 0
    for i, (row, reference, applied) in enumerate(zip(recorder.exported, module.reference_norms, recorder.applied)):
        assert row["norm"] == pytest.approx(reference, rel=1e-5), i  # this step's, pre-clip
        assert applied == pytest.approx(min(reference, 0.5), rel=1e-5), i  # Lightning's clipping, by gradwatch
        # the mean of the step's two training_step losses (Lightning's 1/accumulate_grad_batches undone)
        assert row["loss"] == pytest.approx(sum(module.losses[2 * i : 2 * i + 2]) / 2, rel=1e-6), i
        clipped += reference > 0.5
    assert clipped > 0


def test_manual_optimization_with_max_grad_norm(tmp_path):
    module = Regressor(manual=True)
    gw = GradwatchCallback(run="pl", port=0, every=1, max_grad_norm=0.5)
    recorder = Recorder(gw)
    fit(module, data(6), [gw, recorder], tmp_path)
    assert len(recorder.exported) == 6
    for i, (row, reference, applied) in enumerate(zip(recorder.exported, module.reference_norms, recorder.applied)):
        assert row["norm"] == pytest.approx(reference, rel=1e-5), i
        assert applied == pytest.approx(min(reference, 0.5), rel=1e-5), i
        assert row["loss"] == pytest.approx(module.losses[i], rel=1e-6), i
    assert any(r > 0.5 for r in module.reference_norms)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_nan_batch_is_skipped_and_equals_the_run_without_it(tmp_path, manual):
    poisoned, reference = Regressor(manual=manual), Regressor(manual=manual)
    gw = GradwatchCallback(run="pl", port=0)
    recorder = Recorder(gw)
    fit(poisoned, data(8, poison=3), [gw, recorder], tmp_path / "a")
    fit(reference, data(8, drop=(3,)), [GradwatchCallback(run="ref", port=0)], tmp_path / "b")
    assert [row["skipped"] for row in recorder.exported] == [0, 0, 0, 1, 1, 1, 1, 1]
    for (name, p), q in zip(poisoned.named_parameters(), reference.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name


def test_watchdog_clipping_command_takes_effect_on_the_applied_gradients(tmp_path, watchdog):
    module = Regressor()
    gw = GradwatchCallback(run="pl", port=0, every=1, watchdog_url=watchdog.url, poll_interval_s=0.05)
    recorder = Recorder(gw, before_batch=lambda i: i == 2 and send(watchdog, gw.agent, [
        {"action": "enable_clipping", "mode": "global_norm", "threshold": 1e-3},
    ]))
    fit(module, data(5), [gw, recorder], tmp_path, gradient_clip_val=0.5)
    assert [(a.status, a.step) for a in watchdog.acks] == [("applied", 3)]
    for i, (reference, applied) in enumerate(zip(module.reference_norms, recorder.applied)):
        assert applied == pytest.approx(min(reference, 0.5 if i < 2 else 1e-3), rel=1e-4), i
    assert [row["norm"] for row in recorder.exported] == pytest.approx(module.reference_norms, rel=1e-5)


def test_state_rides_in_lightning_checkpoints_and_stop_checkpoint_commands(tmp_path, watchdog):
    module = Regressor()
    gw = GradwatchCallback(run="pl", port=0, watchdog_url=watchdog.url, poll_interval_s=0.05)
    recorder = Recorder(gw, before_batch=lambda i: i == 3 and send(watchdog, gw.agent, [
        {"action": "lower_lr", "factor": 0.5}, {"action": "checkpoint"}, {"action": "stop"},
    ]))
    trainer = fit(module, data(8), [gw, recorder], tmp_path)
    assert trainer.global_step == 4  # stopped gracefully after the step the commands arrived at
    assert {a.status for a in watchdog.acks} == {"applied"}
    path = tmp_path / "checkpoints" / "gradwatch-step=4.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][gw.state_key]["agent"]
    assert saved["step"] == 4 and saved["remediation"]["lr_scale"] == 0.5

    resumed = GradwatchCallback(run="pl", port=0)
    seen = []
    fit(Regressor(), data(8), [resumed, Recorder(resumed, before_batch=lambda i: seen.append(
        (resumed.agent.step, sample(resumed.agent, m.LR_SCALE))))], tmp_path, ckpt_path=str(path))
    assert seen[0] == (4, 0.5)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_batch_the_agent_asks_to_skip_leaves_the_weights_untouched(tmp_path, manual):
    """The hook point for rollback's skipped batches: ``agent.should_skip()`` is asked once per batch."""
    skipping, reference = Regressor(manual=manual), Regressor(manual=manual)
    gw = GradwatchCallback(run="pl", port=0)
    asked = []

    class Skipper(pl.Callback):  # stands in for the agent's own should_skip(): the 4th batch
        def on_fit_start(self, trainer, pl_module):
            gw.agent.should_skip = lambda: asked.append(len(asked)) or len(asked) == 4

    fit(skipping, data(8), [gw, Skipper()], tmp_path / "a")
    fit(reference, data(8, drop=(3,)), [GradwatchCallback(run="ref", port=0)], tmp_path / "b")
    assert asked == list(range(8))
    for (name, p), q in zip(skipping.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_lightning_grad_scaler_skips_are_counted(tmp_path):
    """16-mixed: Lightning's GradScaler is handed to the agent (fp16 autocast on CPU, as on GPU)."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 gradients at first: steps skipped
    scales = []

    class Scale(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            scales.append(scaler.get_scale())

    gw = GradwatchCallback(run="pl", port=0)
    recorder = Recorder(gw)
    fit(Regressor(), data(6), [gw, recorder, Scale()], tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    scales.append(scaler.get_scale())
    overflows = sum(after < before for before, after in zip(scales, scales[1:]))
    assert overflows > 0
    assert recorder.exported[-1]["amp_overflow"] == overflows
    assert len(recorder.exported) == 6  # gradwatch_step counts every step attempted, skipped ones included

