"""The default rule pack over synthetic but realistic runs, scraped and evaluated every 2 s.

Healthy shapes we must stay quiet on for a whole run; pathologies that must fire the
right alert within a known number of evaluations. Randomness is seeded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.alert import AlertState
from gradwatch.watchdog.engine import RuleEngine
from gradwatch.watchdog.rules.loader import load_rules
from gradwatch.watchdog.samples import SampleStore, build_labels

SCRAPE_S = 2.0
T0 = 1_700_000_000.0
NAN = math.nan


@dataclass
class Scrape:
    """What one scrape of one rank's /metrics shows."""

    step: float
    loss: float
    norm: float
    norm_max: float  # max since the previous scrape
    ratios: dict[str, float]  # layer -> update ratio
    grad_means: dict[str, float]  # layer -> mean |g|
    depths: dict[str, int]
    skipped: float = 0.0  # gradwatch_skipped_steps_total{reason="nonfinite"}
    nonfinite: dict[str, float] = field(default_factory=dict)  # layer -> count; series exist from the first event


# (scrape index, seconds since start, rng) -> what the scrape shows; None: no scrape
Shape = Callable[[int, float, random.Random], Scrape | None]


def feed(store: SampleStore, t: float, run: str, s: Scrape) -> None:
    base = {"run": run, "rank": "0"}
    g = build_labels(base)
    for name, v in (
        (mn.STEP, s.step), (mn.LOSS, s.loss), (mn.GRAD_GLOBAL_NORM, s.norm), (mn.GRAD_GLOBAL_NORM_MAX, s.norm_max)
    ):
        store.add(t, name, g, v)
    store.add(t, mn.SKIPPED_STEPS_TOTAL, build_labels({**base, "reason": "nonfinite"}), s.skipped)
    for layer, depth in s.depths.items():
        ll = build_labels({**base, "layer": layer})
        store.add(t, mn.LAYER_DEPTH, ll, depth)
        store.add(t, mn.UPDATE_RATIO, ll, s.ratios[layer])
        store.add(t, mn.GRAD_ABS_MEAN, ll, s.grad_means[layer])
    for layer, count in s.nonfinite.items():
        store.add(t, mn.NONFINITE_GRADS_TOTAL, build_labels({**base, "layer": layer, "kind": "nan"}), count)


@dataclass
class Timeline:
    firing: list[set[tuple[str, str]]]  # per evaluation: {(alertname, run)}

    def first(self, alertname: str, run: str = "r1") -> int | None:
        return next((i for i, f in enumerate(self.firing) if (alertname, run) in f), None)

    def ever(self) -> set[tuple[str, str]]:
        return set().union(*self.firing)


def simulate(shapes: dict[str, Shape], minutes: float, seed: int = 0) -> Timeline:
    rng = random.Random(seed)
    engine = RuleEngine(load_rules().rules)
    store = SampleStore()
    firing = []
    for i in range(int(minutes * 60 / SCRAPE_S)):
        t = i * SCRAPE_S
        for run, shape in shapes.items():
            scrape = shape(i, t, rng)
            if scrape is not None:
                feed(store, T0 + t, run, scrape)
        result = engine.eval(T0 + t, store)
        assert result.errors == {}
        firing.append({(a.rule, a.label("run")) for a in engine.alerts() if a.state == AlertState.FIRING})
    return Timeline(firing)


def noise(rng: random.Random, sigma: float) -> float:
    return math.exp(rng.gauss(0.0, sigma))


# --- the pack itself -----------------------------------------------------------------------------------


def test_every_default_rule_has_a_severity_a_summary_and_a_description():
    for rule in load_rules().rules:
        assert rule.labels.get("severity") in ("critical", "warning"), rule.name
        assert {"summary", "description"} <= rule.annotations.keys(), rule.name


def test_the_default_pack_reads_only_metrics_of_the_contract():
    contract = {v for k, v in vars(mn).items() if k.isupper() and isinstance(v, str) and v.startswith(mn.PREFIX)}
    for rule in load_rules().rules:
        fields = rule.model_dump()
        names = [fields.get(k) for k in ("metric", "depth_metric", "ratio_metric", "anchor")]
        names += [sel["metric"] for k in ("counters", "gauges") for sel in fields.get(k) or []]
        assert {n for n in names if n} <= contract, rule.name


def test_the_default_pack_has_no_low_side_update_ratio_alert():
    # fine-tuning at lr 1e-5 and cosine tails sit below DL4J's -4 by design
    assert all(r.side == "above" for r in load_rules().rules if r.kind == "band")


# --- healthy shapes -----------------------------------------------------------------------------------

SMALL_NET = {
    "embed.weight": 0, "fc1.weight": 1, "fc1.bias": 1, "fc2.weight": 2, "fc2.bias": 2, "head.weight": 3, "head.bias": 3,
}


def small_net_adam(norm_scale: float = 1.0) -> Shape:
    """A small MLP under Adam at lr 3e-3, 10 steps/s: Adam's first updates ~lr per element
    (ratio up to 0.3 on the widest layer), then ~1e-2 for a long while; zero-initialised
    biases (ratio Inf, then > 1); grad norm high for the first steps with early blips."""

    def shape(i: int, t: float, rng: random.Random) -> Scrape:
        norm = norm_scale * (6 * math.exp(-t / 15) + 0.8 + 0.4 * math.exp(-t / 400)) * noise(rng, 0.25)
        if i in (7, 12):
            norm *= 3  # early transients
        adam = 0.15 * math.exp(-t / 8) + 0.012 * math.exp(-t / 900) + 0.003
        ratios, means = {}, {}
        for layer, depth in SMALL_NET.items():
            if layer.endswith("bias"):
                ratios[layer] = math.inf if i == 0 else 3.0 * noise(rng, 0.3)
            else:
                ratios[layer] = adam * (0.5 + 0.5 * depth) * noise(rng, 0.2)
            means[layer] = 2e-4 * 3**depth * noise(rng, 0.3)
        return Scrape(
            step=20 * i,
            loss=(2.3 * math.exp(-t / 240) + 0.04) * noise(rng, 0.15),
            norm=norm,
            norm_max=norm * (1 + abs(rng.gauss(0, 0.4))),
            ratios=ratios,
            grad_means=means,
            depths=SMALL_NET,
        )

    return shape


LLM = {
    "tok_embeddings.weight": 0,
    "layers.0.attention.wq.weight": 1,
    "layers.0.feed_forward.w1.weight": 2,
    "layers.1.attention.wq.weight": 3,
    "norm.weight": 4,
    "output.weight": 5,
}


def llm_warmup(i: int, t: float, rng: random.Random) -> Scrape:
    """A transformer at 1 step/s: 10-minute linear LR warm-up; the grad norm swings over the
    first hundred steps, then rises 4x during warm-up; sparse embedding gradients (log10 first/last
    about -4); loss 10.8 falling with bumps early on; occasional 3x grad-norm blips."""
    step = 2 * i
    warm = min(1.0, step / 600)
    if step < 100:
        norm = (12 * math.exp(-t / 10) + 1.0) * noise(rng, 0.3)
    else:
        norm = (0.6 + 1.8 * warm) * math.exp(-max(0.0, t - 600) / 3000) * noise(rng, 0.15)
    if rng.random() < 1 / 150:
        norm *= 3
    loss = (3.2 + 7.6 * math.exp(-step / 300)) * noise(rng, 0.02)
    if step < 100 and rng.random() < 0.2:
        loss += 0.5
    ratios = {layer: 2e-3 * warm * noise(rng, 0.2) for layer in LLM}
    means = {layer: (3e-7 if d == 0 else 1e-4 * 2**d) * noise(rng, 0.3) for layer, d in LLM.items()}
    return Scrape(step, loss, norm, norm * (1 + abs(rng.gauss(0, 0.2))), ratios, means, LLM)


def finetune(i: int, t: float, rng: random.Random) -> Scrape:
    """Fine-tuning a pretrained model at lr 1e-5: update ratios ~1e-5, loss drifting down slowly."""
    ratios = {layer: (1e-3 if layer.endswith("bias") else 1e-5) * noise(rng, 0.3) for layer in SMALL_NET}
    means = {layer: 1e-3 * noise(rng, 0.3) for layer in SMALL_NET}
    norm = 3 * noise(rng, 0.2)
    loss = (0.7 + 0.2 * math.exp(-t / 900)) * noise(rng, 0.08)
    return Scrape(5 * i, loss, norm, norm * 1.2, ratios, means, SMALL_NET)


def cosine_tail(smooth: bool) -> Shape:
    """The last half hour of a cosine schedule: ratios from 5e-5 down to 5e-6; the loss with
    minibatch noise, or (full-batch) perfectly smooth and within 1% for many minutes."""

    def shape(i: int, t: float, rng: random.Random) -> Scrape:
        lr = 5e-5 * (1 - 0.9 * t / 1800)
        ratios = {layer: lr * noise(rng, 0.1) for layer in LLM}
        means = {layer: 1e-4 * 2**d * noise(rng, 0.3) for layer, d in LLM.items()}
        loss = 0.2501 - 1e-6 * t if smooth else 2.1 * noise(rng, 0.015)
        norm = 0.3 * noise(rng, 0.1)
        return Scrape(2 * i, loss, norm, norm * 1.1, ratios, means, LLM)

    return shape


def slow_steps_with_pause() -> Shape:
    """A large model at one step every 6 s (three scrapes see the same step), with a 4-minute
    evaluation/checkpoint pause at minute 12 during which every value stays frozen."""
    last: list[Scrape] = []

    def shape(i: int, t: float, rng: random.Random) -> Scrape:
        if last and (720 <= t < 960 or i % 3):
            return last[0]
        step = (min(t, 720) + max(0.0, t - 960)) // 6
        norm = 1.5 * noise(rng, 0.2)
        means = {layer: 1e-3 * 2**d * noise(rng, 0.2) for layer, d in LLM.items()}
        ratios = {layer: 1e-3 * noise(rng, 0.2) for layer in LLM}
        last[:] = [Scrape(step, 2.5 * noise(rng, 0.1), norm, norm, ratios, means, LLM)]
        return last[0]

    return shape


LORA = {
    "base.q.weight": 0, "lora_A.q.weight": 0, "lora_B.q.weight": 1,
    "base.v.weight": 2, "lora_A.v.weight": 2, "lora_B.v.weight": 3,
}


def lora(i: int, t: float, rng: random.Random) -> Scrape:
    """LoRA: frozen base weights (no gradient, no update), zero-initialised B matrices whose update
    ratio starts at Inf and decays like 1/sqrt(steps)."""
    step = 10 * i
    ratios, means = {}, {}
    for layer in LORA:
        if layer.startswith("base"):
            ratios[layer], means[layer] = 0.0, 0.0
        elif layer.startswith("lora_B"):
            ratios[layer] = math.inf if step == 0 else 1.25 / math.sqrt(step) * noise(rng, 0.1)
            means[layer] = 1e-3 * noise(rng, 0.3)
        else:
            ratios[layer], means[layer] = 2e-4 * noise(rng, 0.2), 1e-5 * noise(rng, 0.3)
    norm = 0.5 * noise(rng, 0.2)
    return Scrape(step, (1.2 + 0.5 * math.exp(-t / 600)) * noise(rng, 0.1), norm, norm * 1.3, ratios, means, LORA)


def small_batches(i: int, t: float, rng: random.Random) -> Scrape:
    """Small batches: each scrape's loss spread ~40%, heavy-tailed grad norm (5x blips 1 scrape in 100)."""
    norm = noise(rng, 0.4) * (5 if rng.random() < 0.01 else 1)
    ratios = {layer: (2.0 if layer.endswith("bias") else 1e-2) * noise(rng, 0.3) for layer in SMALL_NET}
    means = {layer: 1e-3 * 2**d * noise(rng, 0.3) for layer, d in SMALL_NET.items()}
    loss = (0.05 + 2.3 * math.exp(-t / 300)) * noise(rng, 0.4)
    return Scrape(20 * i, loss, norm, norm * (1 + abs(rng.gauss(0, 0.5))), ratios, means, SMALL_NET)


HEALTHY: dict[str, Callable[[], Shape]] = {  # fresh shape per run: some keep state
    "small-net-adam-lr3e-3": small_net_adam,
    "small-batches-noisy": lambda: small_batches,
    "llm-warmup": lambda: llm_warmup,
    "finetune-lr1e-5": lambda: finetune,
    "cosine-tail-noisy": lambda: cosine_tail(smooth=False),
    "cosine-tail-full-batch": lambda: cosine_tail(smooth=True),
    "slow-steps-with-pause": slow_steps_with_pause,
    "lora-zero-init": lambda: lora,
}


@pytest.mark.parametrize("name", HEALTHY)
@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_training_never_alerts(name, seed):
    timeline = simulate({"r1": HEALTHY[name]()}, minutes=30, seed=seed)
    assert timeline.ever() == set()


# --- pathologies --------------------------------------------------------------------------------------


def with_events(base: Shape, events: Callable[[int, Scrape], Scrape | None]) -> Shape:
    """``base`` with ``events(i, scrape)`` applied to each scrape."""
    return lambda i, t, rng: events(i, base(i, t, rng))


def test_exploding_gradients_alert_within_seconds_and_nan_keeps_it_alerting():
    onset = 150  # minute 5
    growth = [0.24 * 4000 ** (j / 5) for j in range(1, 6)]  # BLOOM-176B: 0.24 -> 960 in five steps

    def explode(i: int, s: Scrape) -> Scrape:
        if onset <= i < onset + 5:
            s.norm = s.norm_max = growth[i - onset]
        elif i >= onset + 5:
            s.norm = s.norm_max = s.loss = NAN
            s.skipped = 20.0 * (i - onset - 4)  # every step is now skipped as non-finite
            s.nonfinite = {layer: 20.0 * (i - onset - 4) for layer in SMALL_NET}
        return s

    timeline = simulate({"r1": with_events(small_net_adam(norm_scale=0.24), explode)}, minutes=8)
    assert timeline.first("GradNormSpike") in range(onset, onset + 4)  # within 6 s of the first abnormal scrape
    assert timeline.first("GradNonFinite") == onset + 5  # the first NaN scrape
    # from the first alert on, a critical alert is firing at every evaluation: NaN never resolves it silently
    start = timeline.first("GradNormSpike")
    assert not any(timeline.firing[:start])  # nothing before the explosion
    assert all({("GradNormSpike", "r1"), ("GradNonFinite", "r1")} & f for f in timeline.firing[start:])


@pytest.mark.parametrize("new_series", [False, True], ids=["skipped-step-counter", "new-layer-counter"])
def test_a_single_nonfinite_step_alerts_at_once_and_resolves_after_the_window(new_series):
    at = 200

    def one_nan(i: int, s: Scrape) -> Scrape:
        if i >= at:
            if new_series:
                s.nonfinite = {"fc2.weight": 1.0}  # the series is born with its first event
            else:
                s.skipped = 1.0
        return s

    timeline = simulate({"r1": with_events(small_net_adam(), one_nan)}, minutes=10)
    assert timeline.first("GradNonFinite") == at
    assert all(("GradNonFinite", "r1") in f for f in timeline.firing[at : at + 29])
    assert ("GradNonFinite", "r1") not in timeline.firing[at + 30]
    assert timeline.ever() == {("GradNonFinite", "r1")}


def test_a_nan_loss_alerts_even_when_no_counter_moves():
    def nan_loss_once(i: int, s: Scrape) -> Scrape:
        if i == 100:
            s.loss = NAN
        return s

    timeline = simulate({"r1": with_events(small_net_adam(), nan_loss_once)}, minutes=5)
    assert timeline.first("GradNonFinite") == 100
    assert ("GradNonFinite", "r1") not in timeline.firing[101]


@pytest.mark.parametrize("seed", range(4))
def test_a_sustained_3x_loss_fires_the_loss_spike(seed):
    onset = 900  # minute 30, once the loss has settled (against a still-falling loss a 3x jump reads lower)

    def spike(i: int, s: Scrape) -> Scrape:
        if onset <= i < onset + 90:
            s.loss *= 3
        return s

    timeline = simulate({"r1": with_events(small_net_adam(), spike)}, minutes=40, seed=seed)
    first = timeline.first("LossSpike")
    assert first in range(onset + 5, onset + 20)  # `for: 10s` = 6 evaluations, noise permitting
    # it stays up while the loss is high, although the loss soon dominates its own window mean
    assert all(("LossSpike", "r1") in f for f in timeline.firing[first : onset + 90])
    assert ("LossSpike", "r1") not in timeline.firing[-1]  # and resolves once the loss is back
    assert timeline.ever() == {("LossSpike", "r1")}


def deep_sigmoid(i: int, t: float, rng: random.Random) -> Scrape:
    """A 20-layer sigmoid MLP: mean |g| falls ~0.8 orders per layer towards the input (log10 first/last = -16)."""
    depths = {f"layers.{d}.weight": d for d in range(20)}
    means = {layer: 1e-2 * 10 ** (-16 * (19 - d) / 19) * noise(rng, 0.1) for layer, d in depths.items()}
    ratios = {layer: 1e-3 * 10 ** (-16 * (19 - d) / 19) for layer, d in depths.items()}
    norm = 0.05 * noise(rng, 0.1)
    return Scrape(10 * i, 2.30 * noise(rng, 0.02), norm, norm, ratios, means, depths)


def test_vanishing_gradients_across_depth_fire_after_five_minutes():
    timeline = simulate({"r1": deep_sigmoid}, minutes=8)
    assert timeline.first("VanishingGradients") == 150  # true from the first scrape, `for: 5m`
    assert timeline.ever() == {("VanishingGradients", "r1")}


def test_a_stalled_step_fires_ten_minutes_after_the_last_progress():
    hang = 150  # the step stops changing at minute 5; the exporter keeps answering

    def hung(i: int, s: Scrape) -> Scrape:
        if i >= hang:
            s.step = 20 * hang
        return s

    timeline = simulate({"r1": with_events(small_net_adam(), hung)}, minutes=17)
    assert timeline.first("TrainingStalled") == hang + 299  # (t-600, t] holds only the stuck value
    assert {name for name, _ in timeline.ever()} == {"TrainingStalled"}


def test_a_run_whose_scrapes_stop_is_reported_stalled():
    last = 150
    shape = small_net_adam()
    timeline = simulate({"r1": lambda i, t, rng: shape(i, t, rng) if i <= last else None}, minutes=17)
    assert timeline.first("TrainingStalled") == last + 299
    assert {name for name, _ in timeline.ever()} == {"TrainingStalled"}


def stuck(i: int, t: float, rng: random.Random) -> Scrape:
    """A network stuck at chance: loss log(10) to 1e-4, every weight update 1e-7 of the weight (biases move)."""
    ratios = {layer: (1e-3 if layer.endswith("bias") else 1e-7) * noise(rng, 0.1) for layer in SMALL_NET}
    means = {layer: 1e-8 * noise(rng, 0.1) for layer in SMALL_NET}
    return Scrape(10 * i, 2.302585 * (1 + 1e-4 * rng.gauss(0, 1)), 1e-6, 1e-6, ratios, means, SMALL_NET)


def test_a_flat_loss_with_tiny_updates_fires_the_plateau():
    timeline = simulate({"r1": stuck}, minutes=12)
    assert timeline.first("TrainingPlateau") == 299  # 150 points at index 149, then `for: 5m`
    assert timeline.ever() == {("TrainingPlateau", "r1")}


def test_alerts_name_the_sick_run_among_healthy_ones():
    def explode(i: int, s: Scrape) -> Scrape:
        if i >= 100:
            s.norm = s.norm_max = 0.24 * 100 ** (i - 99)
        return s

    timeline = simulate(
        {"healthy": small_net_adam(), "sick": with_events(small_net_adam(norm_scale=0.24), explode), "llm": llm_warmup},
        minutes=5,
    )
    assert timeline.ever() == {("GradNormSpike", "sick")}
