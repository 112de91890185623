"""The rules as a Prometheus rule file: each kind's condition written in PromQL.

``gradwatch rules export --format prometheus`` calls :func:`export_rules`; the result
goes into Prometheus's ``rule_files`` or a PrometheusRule's ``spec``. Every kind is
expressible, and each expression computes what :mod:`.conditions` computes — the same
label sets, the same ``$value``, the same decision — so an alert fires and resolves at
the same evaluations in Prometheus as in the watchdog (``tests/integration/
test_rule_export.py`` proves it kind by kind with ``promtool test rules``). Where
PromQL cannot match the engine exactly, the difference is written down at the kind's
function below and nowhere hidden:

* Prometheus 2.x range selectors and the 5 min lookback are closed at the old end
  (``[t - w, t]``), the engine's are open (``(t - w, t]``): a sample exactly ``w``
  old counts in Prometheus only. Prometheus 3 opened them, like the engine.
* Prometheus sums a window with compensated (Kahan) summation and averages it
  incrementally; the engine uses Python's ``sum`` and Welford's mean. Spike ratios,
  z-scores and plateau ranges may differ in the last bits, which changes a decision
  only for a value exactly on the threshold.
* An empty ``match`` value (``{k: ""}``) matches series *without* ``k`` in PromQL,
  nothing in the engine; a rule label with an empty value is dropped by Prometheus,
  kept by the engine.
* Data, not rules: Prometheus marks a series stale as soon as its target or the
  series disappears, so its current value is gone at once; the watchdog's store
  keeps the last point current for the 5 min lookback.

A rule that cannot be exported — a ``layer_pattern`` Go's RE2 does not accept, action
labels that would clash with the rule's own labels — is listed with the reason, never
dropped silently; so are parts of a rule that do not travel (escalation steps after
the first ``on_fire`` step).

Remediation travels as labels: a rule with ``on_fire`` carries ``gradwatch_action``
and one ``gradwatch_<param>`` label per parameter of its *first* step, which
:func:`gradwatch.watchdog.remediation.spec_from_labels` turns back into the command
when Alertmanager forwards the alert to the watchdog's webhook.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import yaml

from gradwatch.watchdog.durations import format_duration, parse_duration
from gradwatch.watchdog.remediation import ACTION_LABEL
from gradwatch.watchdog.rules.models import (
    BandRule,
    DepthRule,
    NonFiniteRule,
    PlateauRule,
    Rule,
    RulesFile,
    SpikeRule,
    StallRule,
    ThresholdRule,
)
from gradwatch.watchdog.schema import Action

ACTION_PARAM_PREFIX = "gradwatch_"
"""``gradwatch_<param>`` labels carry the first step's parameters (see :func:`action_labels`)."""


class Unsupported(NamedTuple):
    """A rule, or a part of one, that is not in the exported file, and why."""

    rule: str
    reason: str


class NotExportable(ValueError):
    """Raised by :func:`rule_expr` / :func:`export_rule` for a rule PromQL cannot carry."""


# --- the file ----------------------------------------------------------------------------


def export_rules(
    rules_file: RulesFile | Iterable[Rule], *, group: str = "gradwatch", interval: str | float = "2s"
) -> tuple[str, list[Unsupported]]:
    """The rules as Prometheus rule-file YAML, and what of them is not in it.

    One group named ``group`` evaluated every ``interval`` (a duration or seconds; match
    it to the scrape interval the rules were written for: the default pack's ``for: 2s``
    means two evaluations). Prometheus's ``limit`` belongs to a group, so rules with a nonzero
    ``limit`` go to a group of their own per limit, ``<group>-limit-<n>``.

    ``unsupported`` lists each rule left out and each rule exported without a part
    (its reason says which).
    """
    rules = rules_file.rules if isinstance(rules_file, RulesFile) else list(rules_file)
    seconds = float(interval) if isinstance(interval, int | float) else parse_duration(interval)
    if not seconds > 0:
        raise ValueError(f"interval must be a positive duration, got {interval!r}")
    every = format_duration(seconds)
    groups: dict[int, list[dict[str, Any]]] = {}
    unsupported: list[Unsupported] = []
    for rule in rules:
        try:
            exported = export_rule(rule)
        except NotExportable as exc:
            unsupported.append(Unsupported(rule.name, f"not exported: {exc}"))
            continue
        groups.setdefault(rule.limit, []).append(exported)
        unsupported += [Unsupported(rule.name, note) for note in policy_notes(rule)]
    doc = {"groups": []}
    for limit in sorted(groups):
        entry: dict[str, Any] = {"name": group if limit == 0 else f"{group}-limit-{limit}", "interval": every}
        if limit:
            entry["limit"] = limit
        entry["rules"] = groups[limit]
        doc["groups"].append(entry)
    header = [
        "# Generated by `gradwatch rules export --format prometheus`: re-export rather than edit.",
        "# keep_firing_for needs Prometheus >= 2.42. Alerts carrying gradwatch_action labels make the",
        "# watchdog remediate when Alertmanager forwards them to its webhook receiver.",
    ]
    header += [f"# {u.rule}: {u.reason}" for u in unsupported]
    return "\n".join(header) + "\n" + yaml.dump(doc, Dumper=_Dumper, **_DUMP_OPTIONS), unsupported


def export_rule(rule: Rule) -> dict[str, Any]:
    """One Prometheus alerting rule (``alert``, ``expr``, ``for``, ...) for ``rule``; raises :class:`NotExportable`."""
    out: dict[str, Any] = {"alert": rule.name, "expr": rule_expr(rule)}
    if rule.for_:
        out["for"] = format_duration(rule.for_)
    if rule.keep_firing_for:
        out["keep_firing_for"] = format_duration(rule.keep_firing_for)
    labels = {k: _literal_label(v) for k, v in rule.labels.items()}
    if rule.on_fire:
        clash = sorted(k for k in labels if k.startswith(ACTION_PARAM_PREFIX))
        if clash:
            raise NotExportable(
                f"its labels {', '.join(clash)} would be read as parameters of its on_fire action "
                f"(every {ACTION_PARAM_PREFIX}* label is); rename them"
            )
        labels.update(action_labels(rule.on_fire[0].spec))
    if labels:
        out["labels"] = labels
    if rule.annotations:
        out["annotations"] = dict(rule.annotations)
    return out


def action_labels(spec: Action) -> dict[str, str]:
    """``gradwatch_action`` plus one ``gradwatch_<param>`` label per parameter that is set.

    Values are written so that :func:`~gradwatch.watchdog.remediation.spec_from_labels`
    gives back an equal spec (floats by ``repr``, which round-trips).
    """
    labels = {ACTION_LABEL: spec.action}
    for key, value in spec.model_dump(mode="json").items():
        if key != "action" and value is not None:
            labels[ACTION_PARAM_PREFIX + key] = _num(value) if isinstance(value, float) else str(value)
    return labels


def policy_notes(rule: Rule) -> list[str]:
    """What of ``rule.on_fire`` the exported labels do not carry (Alertmanager asks once per firing episode)."""
    steps = rule.on_fire
    if not steps:
        return []
    notes = []
    first = steps[0]
    if first.after:
        notes.append(
            f"exported on_fire acts as soon as Alertmanager forwards the alert, not {first.after} after it fires"
        )
    if len(steps) > 1:
        later = ", ".join(s.spec.action for s in steps[1:])
        notes.append(f"exported with its first on_fire step ({first.spec.action}) only; later steps ({later}) are not")
    if steps[-1].repeat:
        notes.append(f"exported on_fire is taken once per firing episode, not repeated every {steps[-1].repeat}")
    return notes


# --- PromQL per kind --------------------------------------------------------------------------


def rule_expr(rule: Rule) -> str:
    """The PromQL that holds (with the alert's labels and ``$value``) exactly where ``rule``'s condition does."""
    match rule:
        case ThresholdRule():
            return threshold_expr(rule)
        case NonFiniteRule():
            return nonfinite_expr(rule)
        case BandRule():
            return band_expr(rule)
        case SpikeRule():
            return spike_expr(rule)
        case DepthRule():
            return depth_expr(rule)
        case PlateauRule():
            return plateau_expr(rule)
        case StallRule():
            return stall_expr(rule)
    raise NotExportable(f"kind {rule.kind!r} has no PromQL translation")


def threshold_expr(rule: ThresholdRule) -> str:
    """``m > value`` / ``m < value``: the series' current value (NaN compares false in both)."""
    return f"{selector(rule.metric, rule.match)} {'>' if rule.op == 'above' else '<'} {_num(rule.value)}"


def nonfinite_expr(rule: NonFiniteRule) -> str:
    """The model's docstring formula: counter operands, then gauge operands, joined by ``or`` (first wins).

    Per counter ``C``: ``increase(C[w]) > 0``, or else — a series created by its first
    event — ``C > 0 unless C offset w`` for runs whose anchor was there ``w`` ago; the
    engine's ``elif`` is PromQL's ``or`` on the same series. ``min_increase`` filters
    the operand after the ``sum by``, as the engine does.
    """
    w = format_duration(rule.window)
    operands = []
    for sel in rule.counters:
        c = selector(sel.metric, {**rule.match, **sel.match})
        body = f"increase({c}[{w}]) > 0"
        if rule.anchor is not None:
            anchor = selector(rule.anchor, rule.match)
            body += f"\n  or ({c} > 0 unless {c} offset {w}) and on(run, rank) {anchor} offset {w}"
        operand = _by(rule.by, body)
        if rule.min_increase > 0:
            operand = f"{operand} > {_num(rule.min_increase)}"
        operands.append(operand)
    for sel in rule.gauges:
        g = selector(sel.metric, {**rule.match, **sel.match})
        operands.append(_by(rule.by, f"{g} != {g} or {g} == +Inf or {g} == -Inf"))
    return "\nor\n".join(operands)


def _by(by: list[str] | None, body: str) -> str:
    if by is None:
        return f"(\n  {body}\n)" if "\n" in body else f"({body})"
    return f"sum by ({', '.join(by)}) (\n  {body}\n)"


def band_expr(rule: BandRule) -> str:
    """``log10(m{layer=~P}) > hi`` / ``< lo`` / both with ``or``; ``$value`` is the log10.

    PromQL's ``=~`` is anchored like the engine's ``fullmatch``, but it is Go's RE2:
    patterns RE2 refuses are not exported (see :func:`_re2_problem`).
    """
    sel = selector(rule.metric, rule.match, _layer_regex(rule.layer_pattern))
    above, below = f"log10({sel}) > {_num(rule.hi)}", f"log10({sel}) < {_num(rule.lo)}"
    if rule.side == "above":
        return above
    if rule.side == "below":
        return below
    return f"{above}\nor\n{below}"


def spike_expr(rule: SpikeRule) -> str:
    """The model's docstring formulas; ``last_over_time(m[w])`` is the window's newest point.

    ratio: ``x / M >= factor and M > 0`` with ``M = (sum_over_time - x) / (count_over_time - 1)``;
    zscore: ``(x - avg_over_time) / stddev_over_time >= z``; both ``and count_over_time >= min_samples``.
    """
    s = f"{selector(rule.metric, rule.match)}[{format_duration(rule.window)}]"
    x, n = f"last_over_time({s})", f"count_over_time({s})"
    if rule.mode == "ratio":
        mean = f"(sum_over_time({s}) - {x}) / ({n} - 1)"
        hit = f"{x} / ({mean}) >= {_num(rule.factor)}\nand {mean} > 0"  # type: ignore[arg-type]
    else:
        hit = f"({x} - avg_over_time({s})) / stddev_over_time({s}) >= {_num(rule.z)}"  # type: ignore[arg-type]
    return f"{hit}\nand {n} >= {rule.min_samples}"


def depth_expr(rule: DepthRule) -> str:
    """log10(m of the shallowest layer) - log10(m of the deepest) < bound, per run and rank.

    Candidates ``C``: layers matching the pattern whose depth is finite and whose value
    is finite and > 0, joined on identical labels. ``bottomk``/``topk without(layer)``
    pick the shallowest and deepest; ``label_replace`` turns their ``layer`` into
    ``first_layer`` / ``last_layer``. A run with a single candidate scores 0, never
    below ``bound`` (< 0), as the engine skips it.

    Differs from the engine only when two candidates of one run/rank share a depth
    (the agent exports distinct positions): the engine breaks the tie by layer name,
    PromQL takes whichever series comes first.
    """
    layer = _layer_regex(rule.layer_pattern)
    m = selector(rule.metric, rule.match, layer)
    d = selector(rule.depth_metric, rule.match, layer)
    candidates = f"({d} > -Inf < +Inf and {m} > 0 < +Inf)"

    def end(pick: str, label: str) -> str:
        return (
            f'max without(layer) (label_replace(log10({m}) and {pick} without(layer) (1, {candidates}), '
            f'"{label}", "$1", "layer", "(.*)"))'
        )

    return (
        f"{end('bottomk', 'first_layer')}\n"
        f"- ignoring(first_layer, last_layer) group_left(last_layer)\n"
        f"{end('topk', 'last_layer')}\n"
        f"< {_num(rule.bound)}"
    )


def plateau_expr(rule: PlateauRule) -> str:
    """Relative range of the loss over the window < rel_range, while max over layers of the ratio < max_update_ratio.

    ``(max - min) / abs(mean)`` with the engine's mean (sum / count). A NaN or ±Inf in
    the window makes that NaN, so the engine's "every point finite" needs no operand
    of its own; a mean of 0 gives ±Inf or NaN, never below rel_range. ``max without(layer)``
    ignores NaN ratios, as the engine does; loss and ratio series join on identical
    labels besides ``layer``. (Ratios that are all -Inf — impossible for a ratio of
    magnitudes — give -Inf here, no group at all in the engine.)
    """
    s = f"{selector(rule.metric, rule.match)}[{format_duration(rule.window)}]"
    n = f"count_over_time({s})"
    ratio = selector(rule.ratio_metric, rule.match, _layer_regex(rule.layer_pattern))
    return (
        f"(max_over_time({s}) - min_over_time({s})) / abs(sum_over_time({s}) / {n}) < {_num(rule.rel_range)}\n"
        f"and {n} >= {rule.min_samples}\n"
        f"and max without(layer) ({ratio}) < {_num(rule.max_update_ratio)}"
    )


def stall_expr(rule: StallRule) -> str:
    """Unchanged over the window although there ``window`` ago (``$value``: the last step), or silent but not forgotten.

    ``changes()`` counts NaN→NaN as no change, like the engine. Prometheus's staleness
    markers after a target vanishes are skipped by the range functions, so the silent
    branch holds in Prometheus as in the engine.
    """
    s = selector(rule.metric, rule.match)
    w = format_duration(rule.window)
    expr = f"(last_over_time({s}[{w}]) and changes({s}[{w}]) == 0 and {s} offset {w})"
    if rule.stale:
        expr += f"\nor\n(last_over_time({s}[{format_duration(rule.forget_after)}]) unless count_over_time({s}[{w}]))"
    return expr


# --- PromQL text --------------------------------------------------------------------------------


def selector(metric: str, match: Mapping[str, str], regex: Mapping[str, str] | None = None) -> str:
    """``metric{k="v", ..., k=~"re"}`` with Go-quoted values (equality matchers first)."""
    parts = [f"{k}={_quote(v)}" for k, v in match.items()]
    parts += [f"{k}=~{_quote(v)}" for k, v in (regex or {}).items()]
    return f"{metric}{{{', '.join(parts)}}}" if parts else metric


def _quote(text: str) -> str:
    """A PromQL string literal: JSON's escapes are Go's (``\\"``, ``\\\\``, ``\\n``, ``\\uXXXX``)."""
    return json.dumps(text, ensure_ascii=False)


def _num(value: float) -> str:
    """A float as a PromQL number / label value that parses back to the same float (``100``, ``1e-06``, ``-4``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _layer_regex(pattern: str) -> dict[str, str]:
    problem = _re2_problem(pattern)
    if problem:
        raise NotExportable(f"layer_pattern {pattern!r} {problem}; Prometheus's regular expressions are Go's RE2")
    return {"layer": pattern}


_PYTHON_ONLY = (
    (re.compile(r"\(\?(?:=|!|<=|<!)"), "uses a lookaround"),
    (re.compile(r"\(\?P="), "uses a named back-reference"),
    (re.compile(r"\(\?\("), "uses a conditional group"),
    (re.compile(r"\(\?>"), "uses an atomic group"),
    (re.compile(r"\(\?#"), "uses a comment group"),
    (re.compile(r"[*+?}]\+"), "uses a possessive quantifier"),
    (re.compile(r"\(\?[imsU]*[xaLu]"), "uses a flag RE2 lacks (x, a, L or u)"),
)


def _re2_problem(pattern: str) -> str | None:
    """Why Go's RE2 would refuse ``pattern`` (Python-only syntax), or None.

    A scan, not a parser: escapes and character classes are blanked out first so
    ``\\(?=`` or ``[*+]`` are not mistaken for syntax; ``promtool check rules`` on the
    exported file is the final word.
    """
    skeleton, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in "123456789" and not in_class:
                return "uses a back-reference"
            if nxt == "Z":
                return "uses \\Z (RE2 writes \\z)"
            skeleton.append("_")
            i += 2
            continue
        if in_class:
            in_class = c != "]"
            skeleton.append("]" if c == "]" else "_")
        elif c == "[":
            in_class = True
            skeleton.append("[")
            i += 1
            if pattern.startswith("^", i):
                i += 1
            if pattern.startswith("]", i):  # a ] right after [ or [^ is a literal
                i += 1
            continue
        else:
            skeleton.append(c)
        i += 1
    text = "".join(skeleton)
    for rx, why in _PYTHON_ONLY:
        if rx.search(text):
            return why
    return None


def _literal_label(value: str) -> str:
    """Prometheus expands Go templates in label values; the engine does not: keep ``{{`` literal."""
    return value.replace("{{", '{{ "{{" }}')


# --- YAML ---------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # indent lists under their key, as Prometheus's docs do


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None  # multi-line PromQL as a literal block
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)
_DUMP_OPTIONS = {"sort_keys": False, "allow_unicode": True, "width": 10_000, "default_flow_style": False}
