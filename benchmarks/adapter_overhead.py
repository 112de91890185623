"""What the framework adapters cost per optimizer step, side by side with the framework's own grad-norm logging.

    python benchmarks/adapter_overhead.py            # a few minutes on the 2-core dev machine
    python benchmarks/adapter_overhead.py --quick    # smoke run: rough numbers

Per framework, the same model and data are trained in interleaved rounds (shuffled order, one
fit per variant per round) and the step time is read between the framework's own step hooks,
warm-up steps left out, in process CPU time (other tenants of a shared machine do not inflate it):

- Lightning: `grad_norm logging` is the documented way (``self.log_dict(grad_norm(self, 2))`` in
  ``on_before_optimizer_step``) with ``gradient_clip_val=1.0``; `gradwatch` is ``GradwatchCallback``
  (default settings, the clipping handed over) instead of that logging; `neither` only clips.
- Hugging Face: the Trainer always measures its grad norm (its ``clip_grad_norm_`` with
  ``max_grad_norm=1.0``, logged every ``logging_steps``); `gradwatch` adds ``GradwatchTrainerCallback``
  (which takes the clipping over; the Trainer then measures with ``clip_grad_norm_(..., inf)``).

The ratio is per round (adapter / the framework's logging of the same round), shown as the median
and the range over rounds.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
import tempfile
import warnings

import torch

from common import format_table, header_lines

CLOCK = time.process_time


class StepClock:
    """Timestamps taken at the start of every optimizer step; seconds per step after the warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(CLOCK())

    def per_step(self) -> float:
        kept = self.stamps[self.warmup :]
        return (kept[-1] - kept[0]) / (len(kept) - 1)


# -- Lightning --------------------------------------------------------------------------------


def lightning_rounds(rounds: int, steps: int, warmup: int, tmp: str) -> dict[str, list[float]]:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import grad_norm
    from torch.utils.data import DataLoader, TensorDataset

    from gradwatch.agent.integrations.lightning import GradwatchCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # after the import, which sets it

    class Net(pl.LightningModule):
        def __init__(self, log_norms: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = [m for _ in range(8) for m in (torch.nn.Linear(256, 256), torch.nn.Tanh())]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(256, 10))
            self.log_norms = log_norms

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def on_before_optimizer_step(self, optimizer):
            if self.log_norms:
                self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Timer(pl.Callback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.clock.tick()

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * 256, 256, generator=gen), torch.randint(0, 10, (steps * 256,), generator=gen))
    variants = {
        "grad_norm logging": lambda: (Net(log_norms=True), []),
        "gradwatch": lambda: (Net(log_norms=False), [GradwatchCallback(run="bench-pl", port=0)]),
        "neither (clipping only)": lambda: (Net(log_norms=False), []),
    }

    def one(key: str) -> float:
        module, callbacks = variants[key]()
        clock = StepClock(warmup)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=1.0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp, callbacks=[*callbacks, Timer(clock)],
        )
        trainer.fit(module, DataLoader(data, batch_size=256))
        return clock.per_step()

    return interleave(variants, one, rounds)


# -- Hugging Face -----------------------------------------------------------------------------


def huggingface_rounds(rounds: int, steps: int, warmup: int, tmp: str) -> dict[str, list[float]]:
    from torch.utils.data import IterableDataset
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from gradwatch.agent.integrations.huggingface import GradwatchTrainerCallback

    seq, batch = 64, 8

    class Tokens(IterableDataset):
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            for _ in range(steps * batch):
                ids = torch.randint(0, 512, (seq,), generator=gen)
                yield {"input_ids": ids, "labels": ids}

    class Timer(TrainerCallback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_step_begin(self, args, state, control, **kwargs):
            self.clock.tick()

    variants = {
        "Trainer grad_norm logging": lambda: [],
        "gradwatch": lambda: [GradwatchTrainerCallback(run="bench-hf", port=0)],
    }

    def one(key: str) -> float:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
        ))
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, logging_steps=10,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
        )
        clock = StepClock(warmup)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[*variants[key](), Timer(clock)])
        trainer.remove_callback(PrinterCallback)  # no log lines in the table's output
        trainer.train()
        return clock.per_step()

    return interleave(variants, one, rounds)


def interleave(variants: dict, one, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            times[key].append(one(key))
    return times


def rows(framework: str, times: dict[str, list[float]]) -> list[list[str]]:
    base_key = next(iter(times))
    out = []
    for key, values in times.items():
        ratios = [v / b for v, b in zip(values, times[base_key])]
        spread = f"{statistics.median(ratios):.3f}× [{min(ratios):.3f}–{max(ratios):.3f}]"
        out.append([framework, key, f"{statistics.median(values) * 1e3:.2f}", "1 (reference)" if key == base_key else spread])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of short fits (a smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per framework (default 5; --quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 60; --quick: 12)")
    p.add_argument("--frameworks", default="lightning,huggingface")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    steps = args.steps or (12 if args.quick else 60)
    warmup = min(10, steps // 3)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("gradwatch.agent", "lightning", "lightning.pytorch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print("\n".join(header_lines({
        "torch": torch.__version__, "threads": str(torch.get_num_threads()), "device": f"cpu ({os.cpu_count()} logical CPUs)",
        "clock": "process CPU time (time.process_time)",
    })))
    print(f"method:   {rounds} interleaved rounds per framework, {steps} optimizer steps per fit, first {warmup} left out")
    print("models:   lightning: 8x Linear(256,256)+Tanh MLP, batch 256, Adam; huggingface: Llama, 4 layers, hidden 128, "
          "seq 64, batch 8, AdamW")

    table: list[list[str]] = []
    runners = {"lightning": lightning_rounds, "huggingface": huggingface_rounds}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.frameworks.split(","):
            try:
                times = runners[name](rounds, steps, warmup, tmp)
            except ImportError as exc:
                table.append([name, f"n/a ({exc.name} not installed)", "", ""])
                continue
            table += rows(name, times)
    print("\n## ms per optimizer step; ratio to the framework's own grad-norm logging, median [range] over rounds")
    print(format_table(["framework", "variant", "ms/step", "ratio"], table, "<<>>"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
