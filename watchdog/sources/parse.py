"""Turn a Prometheus text exposition into gradwatch samples.

Used by the direct-scrape source on every agent's ``/metrics`` body, every
interval. Parsing is prometheus-client's own parser
(:func:`prometheus_client.parser.text_string_to_metric_families`); this module
decides which samples to keep and how to label them:

- only ``gradwatch_*`` samples, by *sample* name, so counters keep ``_total``;
- no ``_created`` samples (prometheus-client's counter creation times, not data);
- values as floats, NaN and ±Inf included;
- ``job``/``instance`` dropped: Prometheus attaches them, the rules never use them,
  and both sources must hand the store identical label sets;
- the target's own labels (the direct-scrape source passes the registration's
  ``run`` and ``rank``) replace whatever the exposition says, like Prometheus's
  ``honor_labels: false``: a target registered as one run cannot write series of
  another (the value it claimed is not kept).

That parser is pure Python and costs about 25 µs a line: 100 runs x 3,200
series would take 8 s a round. :class:`ExpositionParser` remembers the parser's
answer for an exposition's *shape* (its comment lines, and its sample lines
without their values). An agent exports the same series in the same order every
scrape, so a scrape with the same shape only needs its values read, under 1 µs
a line. Any difference in shape, or a value the shortcut cannot read exactly as
the parser would, sends the whole text through the parser again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from ..metric_names import PREFIX
from ..samples import Labels, SampleStore, build_labels

TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus attaches to every scraped series; dropped by both sources."""

CREATED_SUFFIX = "_created"

SeriesKey = tuple[str, Labels]
"""``(metric name, labels)``: one series, as the store keys it."""


class ParsedSample(NamedTuple):
    name: str
    labels: Labels
    value: float


class ParsedSamples:
    """The samples of one scrape or query, as two aligned columns.

    Columns rather than one object per sample: a round of 100 runs holds 320k
    samples, and allocating an object for each costs as much as reading them.
    ``series`` may be shared with later parses of the same shape: never mutate it.
    """

    __slots__ = ("series", "values")

    def __init__(self, series: Sequence[SeriesKey], values: list[float]) -> None:
        if len(series) != len(values):
            raise ValueError(f"{len(series)} series but {len(values)} values")
        self.series = series
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[ParsedSample]:
        for (name, labels), value in zip(self.series, self.values):
            yield ParsedSample(name, labels, value)

    def add_to(self, store: SampleStore, t: float) -> int:
        """Add every sample to ``store`` at time ``t``; returns how many."""
        add = store.add
        for (name, labels), value in zip(self.series, self.values):
            add(t, name, labels, value)
        return len(self.values)


def should_keep(name: str) -> bool:
    """True for gradwatch data samples (not prometheus-client's ``_created`` timestamps)."""
    return name.startswith(PREFIX) and not name.endswith(CREATED_SUFFIX)


def build_sample_labels(labels: dict[str, str], target: Mapping[str, str] | None = None) -> Labels:
    """Sorted label pairs without the labels Prometheus attaches (``job``, ``instance``), ``target``'s winning."""
    if not TARGET_LABELS.isdisjoint(labels):
        labels = {k: v for k, v in labels.items() if k not in TARGET_LABELS}
    if target:
        labels = {**labels, **target}
    return build_labels(labels)


# A line the parser would read as a kept sample: optional blanks, then a gradwatch_
# name; _created lines are counted apart (they are not kept).
_CANDIDATE = re.compile(rf"^[ \t]*{PREFIX}", re.MULTILINE)
_CREATED = re.compile(rf"^[ \t]*{PREFIX}[^{{\s]*{CREATED_SUFFIX}[{{\s]", re.MULTILINE)


def count_samples(text: str) -> int:
    """How many kept samples ``text`` holds, counted without parsing it (C-speed regular expressions).

    Exact for a well-formed exposition; lets a caller refuse an oversized one before
    spending the parser's ~25 µs a line on it.
    """
    return len(_CANDIDATE.findall(text)) - len(_CREATED.findall(text))


def parse_exposition(text: str, target: Mapping[str, str] | None = None) -> ParsedSamples:
    """Every kept sample of ``text``, in exposition order. Raises ValueError on a malformed exposition.

    ``target``: labels that replace the exposition's (see the module docstring).
    """
    parsed = _parse_all(text, target)
    return _kept(parsed)


def _parse_all(text: str, target: Mapping[str, str] | None) -> list[tuple[SeriesKey | None, float]]:
    """One entry per sample line, in order; the key is None for a sample that is not kept."""
    out: list[tuple[SeriesKey | None, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, build_sample_labels(sample.labels, target)) if should_keep(sample.name) else None
            out.append((key, float(sample.value)))
    return out


def _kept(parsed: list[tuple[SeriesKey | None, float]]) -> ParsedSamples:
    series = [key for key, _ in parsed if key is not None]
    values = [value for key, value in parsed if key is not None]
    return ParsedSamples(series, values)


def _read_value(token: str) -> float:
    """The float the parser would produce for a lone value token, or ValueError."""
    # float() accepts "1_000" and surrounding blanks; the parser refuses both.
    if "_" in token:
        raise ValueError(token)
    return float(token)


# What a shape line holds, for the shortcut.
_COMMENT, _DROPPED, _KEPT = 0, 1, 2


class ExpositionParser:
    """Parses one target's expositions, reusing the parser's work while the shape holds.

    Keep one per target and call :meth:`parse` with each scrape's body. Not
    thread-safe: one scrape of a target at a time. ``target``: labels that replace
    the exposition's (the registration's ``run`` and ``rank``).
    """

    def __init__(self, target: Mapping[str, str] | None = None) -> None:
        self.target = dict(target or {})
        # The shape of the last fully parsed exposition: every non-blank line,
        # comments verbatim and sample lines cut before their value; None when
        # the last text could not take the shortcut.
        self._shape: list[str] | None = None
        self._kinds: list[int] = []
        self._series: list[SeriesKey] = []  # the kept samples' keys, in order
        self.full_parses = 0
        """How often the whole text went through prometheus-client's parser (a shape change)."""

    def parse(self, text: str) -> ParsedSamples:
        """Kept samples of ``text``, in order; the same as :func:`parse_exposition`. Raises ValueError."""
        values = self._values_if_same_shape(text)
        if values is not None:
            return ParsedSamples(self._series, values)
        return self._parse_full(text)

    def _values_if_same_shape(self, text: str) -> list[float] | None:
        shape, kinds = self._shape, self._kinds
        if shape is None:
            return None
        values: list[float] = []
        append = values.append
        n = len(shape)
        i = 0
        try:
            for raw in text.split("\n"):
                line = raw.strip()
                if not line:
                    continue
                if i == n:
                    return None
                kind = kinds[i]
                if kind == _COMMENT:
                    if line != shape[i]:
                        return None
                else:
                    head, _, token = line.rpartition(" ")
                    if head != shape[i]:
                        return None
                    value = _read_value(token)
                    if kind == _KEPT:
                        append(value)
                i += 1
        except ValueError:
            return None
        return values if i == n else None

    def _parse_full(self, text: str) -> ParsedSamples:
        self.full_parses += 1
        self._shape = None  # a parse error leaves no shape behind
        parsed = _parse_all(text, self.target)
        result = _kept(parsed)
        # Pair the parser's samples with the text's sample lines, split exactly as
        # the parser splits them (on "\n", stripped). If the pairing or any check
        # fails, keep no shape: this text takes the full parse every time.
        shape: list[str] = []
        kinds: list[int] = []
        index = 0
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            if line[0] == "#":
                shape.append(line)
                kinds.append(_COMMENT)
                continue
            if index == len(parsed):
                return result
            key, value = parsed[index]
            index += 1
            head, _, token = line.rpartition(" ")
            # Sound only where the last token *is* the value the parser read (no
            # timestamp, no other separator): the head then fixes name and labels.
            try:
                same = _same_float(_read_value(token), value)
            except ValueError:
                same = False
            if not head or not same:
                return result
            shape.append(head)
            kinds.append(_DROPPED if key is None else _KEPT)
        if index == len(parsed):
            self._shape, self._kinds, self._series = shape, kinds, result.series
        return result


def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
