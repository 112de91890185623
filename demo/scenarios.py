"""Seeded training runs on generated data: the pathologies gradwatch must catch, and healthy runs it must leave alone.

Plain PyTorch, no gradwatch import, CPU-sized. The same (name, seed, overrides) gives the same
run, step for step, on one CPU thread (call ``torch.set_num_threads(1)`` first: on the 2-core
machines here torch is several times slower with two threads, and the numbers quoted below were
measured with one)::

    sc = build("exploding_rnn", seed=0)
    for step in range(sc.steps):
        loss = train_step(sc, step)    # zero_grad, forward, backward: the gradients are in .grad now
        optimizer_step(sc)             # the recipe's own clipping (if any), optimizer.step(), scheduler.step()
    print(evaluate(sc))                # mean loss on a fixed held-out batch

``train_step`` stops after backward, so whatever watches the optimizer (hooks, a guard that
skips non-finite steps, a remediation that clips or scales the LR) sits in a standard loop.
Each batch comes from its own generator seeded by (seed, step): skipping or repeating a step
never shifts the data of the others, and ``sc.batch(step)`` can be called again to look at it.

``PATHOLOGIES`` and ``HEALTHY`` list the scenario names; ``describe(name)`` tells each story,
``settings(name)`` lists what ``build`` accepts as overrides.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

Batch = tuple[Tensor, Tensor]


@dataclass
class Scenario:
    """One training recipe, ready to run; see the module docstring for the loop."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler | None
    batch: Callable[[int], Batch]
    """(inputs, targets) of a step; the same step always gives the same batch."""
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    """loss_fn(model(inputs), targets) -> scalar mean loss."""
    steps: int
    """Default run length."""
    eval_batch: Batch
    """Fixed held-out batch, drawn from a stream no training step uses."""
    clip_norm: float | None = None
    """Global-norm clipping the recipe itself applies (``optimizer_step`` does it); None: none."""
    info: dict[str, float | int] = field(default_factory=dict)
    """Scenario-specific facts (documented per scenario in ``describe``): e.g. ``nan_step``,
    ``safe_clip_norm``, ``loss_floor`` (the loss of a perfect model: label noise or entropy)."""


def train_step(scenario: Scenario, step: int) -> Tensor:
    """zero_grad, forward and backward on the batch of ``step``; returns the detached loss.

    Does not step the optimizer: the caller does (``optimizer_step``) after whatever it wants
    to look at or change in the gradients.
    """
    scenario.model.train()
    scenario.optimizer.zero_grad(set_to_none=True)
    inputs, targets = scenario.batch(step)
    loss = scenario.loss_fn(scenario.model(inputs), targets)
    loss.backward()
    return loss.detach()


def optimizer_step(scenario: Scenario) -> None:
    """What the recipe does after backward: its own clipping (if any), optimizer.step(), scheduler.step()."""
    if scenario.clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(scenario.model.parameters(), scenario.clip_norm)
    scenario.optimizer.step()
    if scenario.scheduler is not None:
        scenario.scheduler.step()


@torch.no_grad()
def evaluate(scenario: Scenario) -> float:
    """Mean loss on the fixed held-out batch (NaN/Inf once the model has diverged)."""
    was_training = scenario.model.training
    scenario.model.eval()
    inputs, targets = scenario.eval_batch
    loss = scenario.loss_fn(scenario.model(inputs), targets).item()  # host sync: once per evaluation
    scenario.model.train(was_training)
    return loss


# -- randomness -------------------------------------------------------------------------------

# One stream per purpose, so that e.g. the held-out batch never equals a training batch.
_INIT, _TRAIN, _EVAL, _TASK = 0, 1, 2, 3


def _gen(seed: int, stream: int, step: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + stream) * 1_000_003 + step) % 2**63)


def _init_model(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with torch's default initialisers under ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_gen(seed, _INIT).initial_seed())
        return make()


def _warmup_cosine(optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warm-up over ``warmup`` steps to the optimizer's lr, then cosine down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def _warmup_linear(optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warm-up, then linear decay to 0 at ``total`` (the usual fine-tuning schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return LambdaLR(optimizer, factor)


# -- tasks ------------------------------------------------------------------------------------


def _recall_batch(gen: torch.Generator, size: int, length: int, lag: int, noise: float) -> Batch:
    """Delayed recall (the copy problem with a fixed lag): read u_t ~ U[-1, 1], output u_(t-lag).

    Targets carry Gaussian noise of std ``noise``: a perfect model scores noise**2, so final
    losses of different runs compare on a stable scale instead of on the last digits of ~1e-4.
    """
    inputs = torch.rand(size, length, 1, generator=gen) * 2 - 1
    targets = torch.zeros(size, length)
    targets[:, lag:] = inputs[:, :-lag, 0]
    return inputs, targets + noise * torch.randn(size, length, generator=gen)


def _recall_loss(lag: int) -> Callable[[Tensor, Tensor], Tensor]:
    def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
        # The first `lag` outputs have nothing to recall yet.
        return F.mse_loss(outputs[:, lag:], targets[:, lag:])

    return loss_fn


@dataclass(frozen=True)
class _Teacher:
    """A fixed random tanh network that labels Gaussian inputs: a regression task with a known answer."""

    w1: Tensor
    b1: Tensor
    w2: Tensor

    @classmethod
    def make(cls, gen: torch.Generator, features: int, width: int = 32) -> _Teacher:
        return cls(
            torch.randn(features, width, generator=gen) / math.sqrt(features),
            0.5 * torch.randn(width, generator=gen),
            torch.randn(width, generator=gen) * (2 / math.sqrt(width)),
        )

    def perturbed(self, gen: torch.Generator, scale: float) -> _Teacher:
        """A related task: the same teacher with its output weights moved by ``scale`` of their size."""
        return _Teacher(self.w1, self.b1, self.w2 + scale * self.w2.abs().mean() * torch.randn(self.w2.shape, generator=gen))

    def __call__(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2


def _teacher_batch(gen: torch.Generator, teacher: _Teacher, size: int, features: int, noise: float) -> Batch:
    x = torch.randn(size, features, generator=gen)
    return x, teacher(x) + noise * torch.randn(size, generator=gen)


@dataclass(frozen=True)
class _MarkovChain:
    """A random sparse Markov chain over a small vocabulary: next-token prediction with a known entropy floor."""

    transition: Tensor  # [vocab, vocab], rows sum to 1

    @classmethod
    def make(cls, gen: torch.Generator, vocab: int, successors: int = 4) -> _MarkovChain:
        transition = torch.zeros(vocab, vocab)
        for token in range(vocab):
            nxt = torch.randperm(vocab, generator=gen)[:successors]
            transition[token, nxt] = torch.softmax(1.5 * torch.randn(successors, generator=gen), 0)
        return cls(transition)

    def entropy_rate(self) -> float:
        """Cross-entropy (nats/token) of a model that knows the chain: the floor of the loss."""
        stationary = torch.full((self.transition.shape[0],), 1.0 / self.transition.shape[0])
        for _ in range(500):
            stationary = stationary @ self.transition
        p = self.transition
        row_entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
        return float(stationary @ row_entropy)

    def sample(self, gen: torch.Generator, size: int, length: int) -> Batch:
        tokens = torch.empty(size, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.transition.shape[0], (size,), generator=gen)
        for t in range(length):
            tokens[:, t + 1] = torch.multinomial(self.transition[tokens[:, t]], 1, generator=gen).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]


def _token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- models -----------------------------------------------------------------------------------


class RecallRNN(nn.Module):
    """Vanilla tanh RNN with a linear read-out at every step; recurrent weights orthogonal (spectral radius 1)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.rnn = nn.RNN(1, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.rnn.weight_hh_l0)  # the usual RNN init: no decay, no growth at the start

    def forward(self, inputs: Tensor) -> Tensor:
        out, _ = self.rnn(inputs)
        return self.head(out).squeeze(-1)


class MLP(nn.Module):
    """``depth`` Linear layers with ``activation`` between them, in ``self.layers`` (input side first)."""

    def __init__(self, features: int, width: int, depth: int, out: int, activation: type[nn.Module] = nn.GELU):
        super().__init__()
        sizes = [features] + [width] * (depth - 1) + [out]
        modules: list[nn.Module] = []
        for i in range(depth):
            modules.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < depth - 1:
                modules.append(activation())
        self.layers = nn.Sequential(*modules)
        self.squeeze = out == 1

    def forward(self, x: Tensor) -> Tensor:
        y = self.layers(x)
        return y.squeeze(-1) if self.squeeze else y


class TinyTransformer(nn.Module):
    """Pre-norm causal transformer encoder for next-token prediction."""

    def __init__(self, vocab: int, length: int, width: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.pos[:n]
        h = self.encoder(h, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(h))


# -- recipes: (name, seed, **settings) -> Scenario ---------------------------------------------


def _recall_rnn(
    name: str,
    seed: int,
    *,
    hidden: int = 64,
    length: int = 40,
    lag: int = 8,
    noise: float = 0.05,
    batch: int = 128,
    peak_lr: float = 0.4,
    warmup: int = 800,
    steps: int = 1200,
    clip_norm: float | None = None,
) -> Scenario:
    """Delayed recall with a tanh RNN; SGD + momentum 0.9, linear warm-up then cosine to 0."""
    model = _init_model(seed, lambda: RecallRNN(hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9)
    return Scenario(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=_warmup_cosine(optimizer, warmup, steps),
        batch=lambda step: _recall_batch(_gen(seed, _TRAIN, step), batch, length, lag, noise),
        loss_fn=_recall_loss(lag),
        steps=steps,
        eval_batch=_recall_batch(_gen(seed, _EVAL), 1024, length, lag, noise),
        clip_norm=clip_norm,
        info={"safe_clip_norm": 0.25, "loss_floor": noise**2},
    )


def _teacher_mlp(
    name: str,
    seed: int,
    *,
    features: int = 16,
    width: int = 128,
    noise: float = 0.1,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 50,
    steps: int = 600,
    nan_step: int | None = None,
) -> Scenario:
    """Regression on a random teacher with a 3-layer GELU MLP; Adam, warm-up then cosine to 0."""
    teacher = _Teacher.make(_gen(seed, _TASK), features)
    model = _init_model(seed, lambda: MLP(features, width, 3, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def make_batch(step: int) -> Batch:
        x, y = _teacher_batch(_gen(seed, _TRAIN, step), teacher, batch, features, noise)
        if step == nan_step:  # a corrupted record: one missing feature stored as NaN
            gen = _gen(seed, _TASK, step)
            row = torch.randint(0, batch, (1,), generator=gen)
            col = torch.randint(0, features, (1,), generator=gen)
            x[row, col] = float("nan")
        return x, y

    info: dict[str, float | int] = {"loss_floor": noise**2}
    if nan_step is not None:
        info["nan_step"] = nan_step
    return Scenario(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=_warmup_cosine(optimizer, warmup, steps),
        batch=make_batch,
        loss_fn=F.mse_loss,
        steps=steps,
        eval_batch=_teacher_batch(_gen(seed, _EVAL), teacher, 1024, features, noise),
        info=info,
    )


def _finetune_mlp(
    name: str,
    seed: int,
    *,
    features: int = 16,
    width: int = 128,
    noise: float = 0.1,
    batch: int = 64,
    pretrain_steps: int = 300,
    shift: float = 0.5,
    lr: float = 1e-5,
    warmup: int = 50,
    steps: int = 600,
) -> Scenario:
    """Pre-train on a teacher (Adam 1e-3, inside build: ~0.3 s), fine-tune on a related teacher at lr 1e-5."""
    base = _Teacher.make(_gen(seed, _TASK), features)
    model = _init_model(seed, lambda: MLP(features, width, 3, 1))
    pretrain = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(pretrain_steps):
        x, y = _teacher_batch(_gen(seed, _TASK + 1, step), base, batch, features, noise)
        pretrain.zero_grad()
        F.mse_loss(model(x), y).backward()
        pretrain.step()
    task = base.perturbed(_gen(seed, _TASK + 2), shift)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return Scenario(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=_warmup_linear(optimizer, warmup, steps),
        batch=lambda step: _teacher_batch(_gen(seed, _TRAIN, step), task, batch, features, noise),
        loss_fn=F.mse_loss,
        steps=steps,
        eval_batch=_teacher_batch(_gen(seed, _EVAL), task, 1024, features, noise),
        info={"loss_floor": noise**2},
    )


def _markov_transformer(
    name: str,
    seed: int,
    *,
    vocab: int = 16,
    length: int = 32,
    batch: int = 32,
    peak_lr: float = 3e-3,
    warmup: int = 100,
    steps: int = 600,
    weight_decay: float = 0.01,
) -> Scenario:
    """Next-token prediction on a random sparse Markov chain; 2-layer pre-norm transformer, AdamW."""
    chain = _MarkovChain.make(_gen(seed, _TASK), vocab)
    model = _init_model(seed, lambda: TinyTransformer(vocab, length))
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=weight_decay)
    return Scenario(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=_warmup_cosine(optimizer, warmup, steps),
        batch=lambda step: chain.sample(_gen(seed, _TRAIN, step), batch, length),
        loss_fn=_token_loss,
        steps=steps,
        eval_batch=chain.sample(_gen(seed, _EVAL), 256, length),
        info={"loss_floor": chain.entropy_rate()},
    )


def _deep_sigmoid(
    name: str,
    seed: int,
    *,
    features: int = 16,
    width: int = 32,
    depth: int = 20,
    batch: int = 64,
    lr: float = 0.1,
    steps: int = 600,
) -> Scenario:
    """Two-class problem (the sign of a random teacher) for a ``depth``-layer sigmoid MLP; SGD + momentum."""
    teacher = _Teacher.make(_gen(seed, _TASK), features)
    model = _init_model(seed, lambda: MLP(features, width, depth, 2, activation=nn.Sigmoid))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def labelled(gen: torch.Generator, size: int) -> Batch:
        x = torch.randn(size, features, generator=gen)
        return x, (teacher(x) > 0).long()

    return Scenario(
        name=name,
        model=model,
        optimizer=optimizer,
        scheduler=None,
        batch=lambda step: labelled(_gen(seed, _TRAIN, step), batch),
        loss_fn=F.cross_entropy,
        steps=steps,
        eval_batch=labelled(_gen(seed, _EVAL), 1024),
        info={"depth": depth},
    )


# -- the catalogue ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    recipe: Callable[..., Scenario]
    defaults: dict[str, object]
    story: str


_CATALOGUE: dict[str, _Entry] = {
    "exploding_rnn": _Entry(
        _recall_rnn,
        {},
        "Exploding gradients in a recurrent network. A vanilla tanh RNN (64 units, orthogonal "
        "recurrent weights) learns delayed recall - output the input seen 8 steps earlier, in "
        "40-step sequences with label noise 0.05 - with SGD + momentum 0.9, batch 128 and a linear "
        "LR warm-up to 0.4 over 800 steps, then cosine. The loss falls 90x in the first 130 steps. "
        "As the warm-up carries the LR past the stability edge of the recurrent dynamics, spikes "
        "of the gradient norm appear (about 10x their recent mean; the run recovers from each), recur "
        "and grow, and near LR 0.3 the run goes over the 'cliff' of Pascanu, Mikolov & Bengio "
        "(2013): for seed 0, at step 589, the global gradient norm goes 2 -> 8 -> 10 -> 113 -> 6e3 "
        "-> 2e6 in five steps (BLOOM-176B's log: 0.24 -> 960 in five steps), the loss goes "
        "0.25 -> 1.1 -> 74 -> 1e4, and 14 steps later loss and gradients are Inf/NaN. Global-norm "
        "clipping from step 0 (info['safe_clip_norm'] = 0.25) trains through the same schedule to "
        "0.0030 (noise floor 0.0025). A cliff leaves no time: one unclipped step after the "
        "norm first passes 10x its mean wrecks the recurrent weights, so a remedy has to act on "
        "the earlier spikes (for seed 0 the first one, at step 138, is 13x) or clip from the start.",
    ),
    "early_explosion": _Entry(
        _recall_rnn,
        {"warmup": 100, "steps": 500},
        "An explosion too early and too fast to hold: the exploding_rnn recipe with its LR warm-up to 0.4 "
        "over 100 steps instead of 800. The LR reaches the stability edge at once and the cliff comes "
        "inside the first 128 steps, before a spike guard has the history to call a norm a spike: for "
        "seed 0 the global gradient norm is 1.8 at step 101 and 5.5 -> 13 -> 190 -> 1.4e4 at steps 104-107, "
        "and the loss is Inf at step 117; from there every gradient is NaN. A guard that skips non-finite steps keeps "
        "the weights finite but frozen where the explosion left them, so clipping and LR cuts, which act "
        "on later gradients, change nothing. Going back does (PaLM restarted ~100 steps before its loss "
        "spikes and skipped 200-500 batches; OPT-175B's operators rolled back and lowered the LR): the "
        "state of step 100 with clipping on and the LR halved twice trains to 0.0032, as the same seed "
        "clipped from step 0 (info['safe_clip_norm'] = 0.25) does.",
    ),
    "nan_batch": _Entry(
        _teacher_mlp,
        {"nan_step": 300},
        "A corrupted record. A healthy MLP regression (Adam, warm-up + cosine) meets, at step "
        "info['nan_step'] = 300, a batch in which one record has a missing feature stored as NaN. "
        "The loss is NaN, so every gradient is NaN, and an unguarded optimizer.step() writes NaN "
        "into every weight: the run is dead from then on, and a logger that filters NaN losses "
        "(Hugging Face Trainer's logging_nan_inf_filter) can keep it looking alive. Skipping that "
        "one non-finite step, as torch.amp.GradScaler does on overflow, costs nothing: the run "
        "ends where healthy_mlp does.",
    ),
    "vanishing": _Entry(
        _deep_sigmoid,
        {},
        "Vanishing gradients. A 20-layer sigmoid MLP (width 32, PyTorch's default init) on a "
        "two-class problem, SGD + momentum. The sigmoid's slope is at most 1/4, so each layer "
        "shrinks the backward signal: the first layer's mean |grad| is about 1e-16 of the last "
        "layer's (log10 ratio -16, the value in FIELD_NOTES). The first layers never learn, the "
        "top layers see inputs that carry almost nothing, and the loss stays near ln 2 = 0.69 - "
        "the 'loss barely changes, accuracy low' that users report (Hochreiter 1991; Bengio, "
        "Simard & Frasconi 1994; Glorot & Bengio 2010).",
    ),
    "lr_too_high": _Entry(
        _markov_transformer,
        {"peak_lr": 0.3},
        "A learning rate that is too high. The healthy_transformer recipe (2-layer pre-norm "
        "transformer, AdamW, next-token prediction on a random Markov chain) with its warm-up "
        "going to a peak LR of 0.3 instead of 3e-3. The loss first falls, then blows up as the "
        "LR climbs (4.2 nats at step 50, from 0.8) and wanders between 1.5 and 1.9 for the rest "
        "of the run, while the healthy run sits at the chain's entropy, 0.77. Each step moves "
        "the weights by up to half their own mean magnitude (mean|dw|/mean|w| up to 0.5, "
        "typically 0.02-0.04), where DL4J and cs231n put healthy training near 1e-3 and call "
        "anything above 1e-2 unstable.",
    ),
    "healthy_rnn": _Entry(
        _recall_rnn,
        {"peak_lr": 0.05, "warmup": 100, "steps": 800, "clip_norm": 0.25},
        "Healthy: the exploding_rnn recipe at a safe peak LR (0.05 instead of 0.4, reached after "
        "100 steps) with global-norm clipping at 0.25. The gradient norm falls from 1.5 to ~0.05 "
        "while the loss falls to 0.0030 (noise floor 0.0025); no spike reaches 4x its recent mean.",
    ),
    "healthy_mlp": _Entry(
        _teacher_mlp,
        {},
        "Healthy: a 3-layer GELU MLP regressing a random teacher with Adam at 1e-3, 50 warm-up "
        "steps then cosine. The loss falls 20x with the usual early swings of the gradient norm "
        "(up to 2.5x its recent mean); updates stay near 1e-3 of the weights.",
    ),
    "healthy_transformer": _Entry(
        _markov_transformer,
        {},
        "Healthy: a 2-layer pre-norm transformer learning next-token prediction on a random "
        "Markov chain, AdamW at 3e-3 with 100 warm-up steps then cosine. The loss falls from "
        "ln 16 = 2.8 to 0.82 by step 100 and ends within 1% of the chain's entropy (0.77 nats).",
    ),
    "healthy_finetune": _Entry(
        _finetune_mlp,
        {},
        "Healthy: fine-tuning. An MLP pre-trained on one teacher (inside build) is fine-tuned on a "
        "related one at lr 1e-5 (AdamW, warm-up then linear decay). Updates are tiny by design "
        "(mean|dw|/mean|w| ~ 5e-5, below DL4J's 'too slow' band) while the loss keeps falling.",
    ),
}

NAMES: tuple[str, ...] = tuple(_CATALOGUE)
PATHOLOGIES: tuple[str, ...] = ("exploding_rnn", "early_explosion", "nan_batch", "vanishing", "lr_too_high")
HEALTHY: tuple[str, ...] = tuple(n for n in NAMES if n.startswith("healthy_"))


def settings(name: str) -> dict[str, object]:
    """The settings ``build`` accepts for ``name``, with this scenario's values."""
    entry = _entry(name)
    params = inspect.signature(entry.recipe).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return defaults | entry.defaults


def build(name: str, seed: int = 0, **overrides) -> Scenario:
    """A fresh scenario; ``overrides`` replace settings (see ``settings(name)``), e.g. ``steps=300``."""
    known = settings(name)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"scenario {name!r} has no setting {', '.join(unknown)}; it has: {', '.join(known)}")
    return _entry(name).recipe(name, seed, **(_entry(name).defaults | overrides))


def describe(name: str) -> str:
    """One paragraph for the demo to print: what goes wrong, why, and where the field has seen it."""
    return _entry(name).story


def _entry(name: str) -> _Entry:
    if name not in _CATALOGUE:
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(NAMES)}")
    return _CATALOGUE[name]
