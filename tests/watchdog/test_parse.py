"""Exposition parsing: what the scrape source stores from an agent's /metrics text."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from gradwatch.watchdog.sources.parse import ExpositionParser, parse_exposition

ODD_LAYER = 'blocks.0."attn" \\ q\nproj'  # quote, backslash and newline: escaped in the exposition


def _comparable(samples) -> dict:
    """(name, labels) -> value, with NaN made comparable (NaN != NaN)."""
    return {(s.name, s.labels): ("NaN" if math.isnan(s.value) else s.value) for s in samples}


def _labels(layer: str | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
    labels = {"run": "r1", "rank": "0", **extra}
    if layer is not None:
        labels["layer"] = layer
    return tuple(sorted(labels.items()))


@pytest.fixture
def metrics():
    """A registry like an agent's, plus a non-gradwatch metric; returns (registry, gauges, counter)."""
    registry = CollectorRegistry()
    grad_norm = Gauge("gradwatch_grad_norm", "Gradient L2 norm.", ["run", "rank", "layer"], registry=registry)
    loss = Gauge("gradwatch_loss", "Loss.", ["run", "rank"], registry=registry)
    nonfinite = Counter(
        "gradwatch_nonfinite_grads", "Non-finite elements.", ["run", "rank", "layer", "kind"], registry=registry
    )
    Gauge("process_open_fds", "Not ours.", registry=registry).set(12)
    grad_norm.labels("r1", "0", "fc1.weight").set(1.5)
    grad_norm.labels("r1", "0", "fc2.weight").set(math.nan)
    grad_norm.labels("r1", "0", ODD_LAYER).set(math.inf)
    loss.labels("r1", "0").set(-math.inf)
    nonfinite.labels("r1", "0", "fc2.weight", "nan").inc(3)
    return registry, grad_norm, nonfinite


EXPECTED = {
    ("gradwatch_grad_norm", _labels("fc1.weight")): 1.5,
    ("gradwatch_grad_norm", _labels("fc2.weight")): "NaN",
    ("gradwatch_grad_norm", _labels(ODD_LAYER)): math.inf,
    ("gradwatch_loss", _labels()): -math.inf,
    # The sample name keeps _total; the counter's _created sample is not data.
    ("gradwatch_nonfinite_grads_total", _labels("fc2.weight", kind="nan")): 3.0,
}


def test_keeps_gradwatch_samples_with_their_values_and_labels(metrics):
    registry, _, _ = metrics
    text = generate_latest(registry).decode()
    assert "gradwatch_nonfinite_grads_created" in text  # the case being tested is really there

    samples = parse_exposition(text)

    assert _comparable(samples) == EXPECTED
    assert all(isinstance(s.value, float) for s in samples)


def test_drops_job_and_instance_labels():
    text = 'gradwatch_step{instance="10.0.0.1:9100",job="trainer",rank="0",run="r1"} 42\n'
    [sample] = parse_exposition(text)
    assert sample.labels == (("rank", "0"), ("run", "r1"))
    assert sample.value == 42.0


def test_shape_reuse_gives_the_same_samples_as_a_full_parse(metrics):
    registry, grad_norm, nonfinite = metrics
    parser = ExpositionParser()
    parser.parse(generate_latest(registry).decode())

    # Same series, new values (NaN turns finite, a finite value turns NaN): the shape holds.
    grad_norm.labels("r1", "0", "fc1.weight").set(math.nan)
    grad_norm.labels("r1", "0", "fc2.weight").set(2.25)
    nonfinite.labels("r1", "0", "fc2.weight", "nan").inc(1)
    text = generate_latest(registry).decode()
    samples = parser.parse(text)

    assert _comparable(samples) == _comparable(parse_exposition(text))
    assert _comparable(samples)[("gradwatch_grad_norm", _labels("fc1.weight"))] == "NaN"
    assert _comparable(samples)[("gradwatch_nonfinite_grads_total", _labels("fc2.weight", kind="nan"))] == 4.0
    assert parser.full_parses == 1


def test_new_series_changes_the_shape_and_is_parsed_fully(metrics):
    registry, grad_norm, nonfinite = metrics
    parser = ExpositionParser()
    parser.parse(generate_latest(registry).decode())

    nonfinite.labels("r1", "0", "fc1.weight", "inf").inc()
    text = generate_latest(registry).decode()
    samples = parser.parse(text)

    assert _comparable(samples) == _comparable(parse_exposition(text))
    assert ("gradwatch_nonfinite_grads_total", _labels("fc1.weight", kind="inf")) in _comparable(samples)
    assert parser.full_parses == 2


def test_timestamps_are_not_mistaken_for_values():
    parser = ExpositionParser()
    for step, ts in ((1, 1000), (2, 2000), (3, 3000)):
        [sample] = parser.parse(f'gradwatch_step{{run="r1",rank="0"}} {step} {ts}\n')
        assert sample.value == float(step)


def test_malformed_exposition_raises_and_the_next_good_one_parses(metrics):
    registry, _, _ = metrics
    text = generate_latest(registry).decode()
    parser = ExpositionParser()
    parser.parse(text)

    broken = text.replace('gradwatch_loss{rank="0",run="r1"} -Inf', 'gradwatch_loss{rank="0",run="r1"} minus-one')
    assert broken != text
    with pytest.raises(ValueError):
        parser.parse(broken)
    assert _comparable(parser.parse(text)) == EXPECTED


def test_value_forms_the_parser_refuses_are_refused_on_the_shortcut_too(metrics):
    registry, _, _ = metrics
    text = generate_latest(registry).decode()
    parser = ExpositionParser()
    parser.parse(text)

    # float() would read "1_5" as 15; prometheus-client's parser refuses it.
    line = 'gradwatch_grad_norm{layer="fc1.weight",rank="0",run="r1"} '
    odd = text.replace(line + "1.5", line + "1_5")
    assert odd != text
    with pytest.raises(ValueError):
        parser.parse(odd)
