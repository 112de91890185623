"""Prometheus's alert state machine for one rule, pure and driven by the clock you pass.

Copied from prometheus ``rules/alerting.go`` (``AlertingRule.Eval``, ``needsSending``,
``sendAlerts``) so that an alert here behaves exactly like the same rule in Prometheus:

* a label set the condition matches for the first time becomes PENDING (``active_at`` = now);
* a PENDING alert becomes FIRING once ``now - active_at >= for`` (``for`` 0: at once);
* a PENDING alert whose condition clears is dropped silently (nothing was ever sent);
* a FIRING alert whose condition clears keeps firing for ``keep_firing_for``, then is
  resolved (state INACTIVE, ``resolved_at`` = now) and kept ``resolved_retention_s``
  (15 min, as Prometheus) so its resolution can be sent, then dropped;
* if the condition returns for a resolved alert, a new PENDING alert starts over;
* more than ``limit`` active (pending + firing) alerts makes the evaluation fail and
  forgets every alert of the rule, as Prometheus's rule-group ``limit`` does;
* a firing alert restored after a restart with ``hold_s`` is not resolved for that long
  after the first evaluation unless its condition was seen again (see :meth:`AlertingRule.restore`).

What to send is decided apart from state by :func:`needs_sending`. Annotations are
expanded with a small subset of Prometheus's Go templates (:func:`compile_template`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from gradwatch.watchdog.alert import Alert, AlertState
from gradwatch.watchdog.samples import Labels, build_labels

if TYPE_CHECKING:
    from gradwatch.watchdog.rules.conditions import Match

RESOLVED_RETENTION_S = 15 * 60.0
"""How long a resolved alert is kept so its resolution can be sent (Prometheus ``resolvedRetention``)."""

DEFAULT_RESEND_DELAY_S = 60.0
"""Minimum time between two sends of a still-firing alert (Prometheus ``--rules.alert.resend-delay``)."""


class AlertLimitExceeded(RuntimeError):
    """More active alerts than the rule's ``limit``: the rule forgot all its alerts (``dropped``)."""

    def __init__(self, rule: str, limit: int, count: int, dropped: list[Alert]) -> None:
        super().__init__(f"exceeded limit of {limit} with {count} alerts")
        self.rule, self.limit, self.count, self.dropped = rule, limit, count, dropped


class DuplicateLabelsError(RuntimeError):
    """Two matches of one evaluation share a label set (Prometheus refuses such a vector too)."""


@dataclass
class Changes:
    """What one evaluation did, as copies of the alerts.

    ``changed``: alerts that became pending, fired or resolved at this evaluation (the
    current state is on the record). ``dropped``: alerts forgotten at this evaluation —
    a pending alert whose condition cleared, or a resolved one past its retention.
    """

    changed: list[Alert] = field(default_factory=list)
    dropped: list[Alert] = field(default_factory=list)


def needs_sending(alert: Alert, now: float, resend_delay_s: float = DEFAULT_RESEND_DELAY_S) -> bool:
    """Whether ``alert`` should go to the notifiers now (Prometheus ``Alert.needsSending``).

    Pending alerts are never sent; a resolution not sent yet is sent at once; a firing
    (or resolved, during its retention) alert is re-sent every ``resend_delay_s`` so the
    receiver does not expire it.
    """
    if alert.state == AlertState.PENDING:
        return False
    if alert.resolved_at is not None and (alert.last_sent_at is None or alert.resolved_at > alert.last_sent_at):
        return True
    return alert.last_sent_at is None or alert.last_sent_at + resend_delay_s < now


def _copy(alert: Alert) -> Alert:
    return replace(alert, annotations=dict(alert.annotations))


class AlertingRule:
    """One rule's active alerts, keyed by label set, advanced by :meth:`eval` at each evaluation."""

    needs_sending = staticmethod(needs_sending)

    def __init__(
        self,
        name: str,
        *,
        for_s: float = 0.0,
        keep_firing_for_s: float = 0.0,
        annotations: Mapping[str, str] | None = None,
        limit: int = 0,
        resolved_retention_s: float = RESOLVED_RETENTION_S,
    ) -> None:
        self.name = name
        self.for_s = for_s
        self.keep_firing_for_s = keep_firing_for_s
        self.limit = limit
        self.resolved_retention_s = resolved_retention_s
        self._templates = {k: compile_template(v) for k, v in (annotations or {}).items()}
        self._active: dict[Labels, Alert] = {}
        self._hold_s: dict[Labels, float] = {}  # restored firing alerts → hold, until the first eval
        self._hold_until: dict[Labels, float] = {}  # ... → end of the hold, from the first eval on

    def eval(self, now: float, matches: Iterable[Match]) -> Changes:
        """Advance every alert of this rule to ``now`` given the condition's ``matches``.

        Each match carries the full alert label set (``alertname`` and rule labels
        included) and the value shown as ``$value``. Raises :class:`DuplicateLabelsError`
        before touching any state, or :class:`AlertLimitExceeded` after forgetting all.
        """
        results: dict[Labels, Alert] = {}
        for m in matches:
            if m.labels in results:
                raise DuplicateLabelsError(f"{self.name}: two matches share the label set {dict(m.labels)}")
            results[m.labels] = Alert(
                rule=self.name,
                labels=m.labels,
                annotations=self.annotate(m.labels, m.value),
                state=AlertState.PENDING,
                value=m.value,
                active_at=now,
            )

        for key, hold_s in self._hold_s.items():
            self._hold_until[key] = now + hold_s
        self._hold_s.clear()

        changed: dict[Labels, None] = {}  # ordered set of keys whose state moved
        for key, new in results.items():
            old = self._active.get(key)
            if old is not None and old.state != AlertState.INACTIVE:
                old.value, old.annotations = new.value, new.annotations
                continue
            self._active[key] = new  # also replaces a resolved alert: the condition came back
            changed[key] = None

        dropped: list[Alert] = []
        active = 0
        for key, a in list(self._active.items()):
            if key not in results:
                keep_firing = False
                if a.state == AlertState.FIRING and self.keep_firing_for_s > 0:
                    if a.keep_firing_since is None:
                        a.keep_firing_since = now
                    keep_firing = now - a.keep_firing_since < self.keep_firing_for_s
                if a.state == AlertState.FIRING and now < self._hold_until.get(key, -math.inf):
                    keep_firing = True  # restored, and the samples to decide otherwise are not back yet
                if a.state == AlertState.PENDING or (
                    a.resolved_at is not None and now - a.resolved_at > self.resolved_retention_s
                ):
                    del self._active[key]
                    dropped.append(_copy(a))
                    continue
                if a.state != AlertState.INACTIVE and not keep_firing:
                    a.state, a.resolved_at = AlertState.INACTIVE, now
                    changed[key] = None
                    self._hold_until.pop(key, None)
                if not keep_firing:
                    continue
            else:
                a.keep_firing_since = None
                self._hold_until.pop(key, None)  # seen again: ordinary rules from now on
            active += 1
            if a.state == AlertState.PENDING and now - a.active_at >= self.for_s:
                a.state, a.fired_at = AlertState.FIRING, now
                changed[key] = None

        if self.limit > 0 and active > self.limit:
            forgotten = [_copy(a) for a in self._active.values()]
            self._active.clear()
            self._hold_until.clear()
            raise AlertLimitExceeded(self.name, self.limit, active, forgotten)
        return Changes([_copy(self._active[k]) for k in changed if k in self._active], dropped)

    def annotate(self, labels: Labels, value: float) -> dict[str, str]:
        """The rule's annotations expanded for one alert (``$labels`` = the alert's labels)."""
        if not self._templates:
            return {}
        label_map = dict(labels)
        return {k: t(label_map, value) for k, t in self._templates.items()}

    def alerts(self) -> list[Alert]:
        """Copies of every alert held: pending, firing, and resolved ones within retention."""
        return [_copy(a) for a in self._active.values()]

    def alerts_to_send(self, now: float, resend_delay_s: float = DEFAULT_RESEND_DELAY_S) -> list[Alert]:
        """Copies of the alerts :func:`needs_sending` picks; marks them sent at ``now`` (Prometheus ``sendAlerts``)."""
        out = []
        for a in self._active.values():
            if needs_sending(a, now, resend_delay_s):
                a.last_sent_at = now
                out.append(_copy(a))
        return out

    def restore(self, alerts: Iterable[Alert], hold_s: float = 0.0) -> int:
        """Take back alerts saved by :meth:`alerts` (e.g. before a restart); returns how many.

        Alerts of other rules, and inactive ones that were never resolved, are ignored.
        Restored alerts keep their state and times: a firing alert stays firing and
        resolves normally if its condition no longer holds (unlike Prometheus, no
        ``for_grace_period`` is applied to pending alerts after a long downtime).

        ``hold_s``: how long, from the first evaluation, a restored firing alert is kept
        firing while its condition does not match. Prometheus reads its history back from
        its TSDB after a restart; a watchdog starts with empty sample windows, so a rule
        over a window (a counter's increase, a spike against its mean, a stall) cannot
        match until the window has refilled — without the hold, the alert would resolve
        and fire again, notifying twice. Seeing the condition again ends the hold.
        """
        n = 0
        for a in alerts:
            if a.rule != self.name or (a.state == AlertState.INACTIVE and a.resolved_at is None):
                continue
            a = _copy(a)
            a.labels = build_labels(dict(a.labels))  # records read back from storage may hold lists
            self._active[a.labels] = a
            if a.state == AlertState.FIRING and hold_s > 0:
                self._hold_s[a.labels] = hold_s
            n += 1
        return n

    def adopt(self, other: AlertingRule) -> None:
        """Take over ``other``'s alerts: a reloaded rule with the same name and labels (Prometheus ``CopyState``)."""
        self._active = other._active
        self._hold_s, self._hold_until = other._hold_s, other._hold_until


# --- annotation templates ------------------------------------------------------------
# A subset of Prometheus's Go templates, enough for alert text:
#   {{ $labels.layer }}  {{ $value }}  {{ $value | humanize }}  {{ $value | humanizePercentage }}
#   {{ printf "%.2f" $value }}  {{ $value | printf "%.3g" }}  {{- ... -}} (trim spaces)
# Anything else is refused when the rules file is loaded, not when an alert fires.

Template = Callable[[Mapping[str, str], float], str]
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[^\s"]+')
_LABEL_REF = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


class TemplateError(ValueError):
    pass


def compile_template(text: str) -> Template:
    """Parse ``text`` once; the result expands it for (labels, value). Raises :class:`TemplateError`."""
    parts: list[str | Callable[[Mapping[str, str], float], Any]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        literal = text[pos : m.start()]
        if m.group(1):
            literal = literal.rstrip()
        parts.append(literal)
        parts.append(_compile_pipeline(m.group(2).strip(), text))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip())
    parts.append(text[pos:])
    if any(isinstance(p, str) and "{{" in p for p in parts):
        raise TemplateError(f"unclosed '{{{{' in {text!r}")
    if len(parts) == 1:
        const = parts[0]
        return lambda labels, value: const  # type: ignore[return-value]

    def expand(labels: Mapping[str, str], value: float) -> str:
        return "".join(p if isinstance(p, str) else _to_text(p(labels, value)) for p in parts)

    expand(_PROBE_LABELS, 1.5)  # a printf verb that cannot take the value fails now, not at fire time
    return expand


_PROBE_LABELS: Mapping[str, str] = {}


def _compile_pipeline(src: str, text: str) -> Callable[[Mapping[str, str], float], Any]:
    stages = [s.strip() for s in src.split("|")]
    if not stages[0]:
        raise TemplateError(f"empty action in {text!r}")
    first = _TOKEN.findall(stages[0])
    if first[0] == "printf":
        fn = _compile_printf(first[1:], None, text)
    elif len(first) == 1:
        fn = _compile_arg(first[0], text)
    else:
        raise TemplateError(f"unsupported action {{{{ {src} }}}} in {text!r}")
    for stage in stages[1:]:
        fn = _compile_stage(_TOKEN.findall(stage), fn, text)
    return fn


def _compile_arg(token: str, text: str) -> Callable[[Mapping[str, str], float], Any]:
    if token == "$value":
        return lambda labels, value: value
    m = _LABEL_REF.fullmatch(token)
    if m:
        name = m.group(1)
        return lambda labels, value: labels.get(name, "")
    if token.startswith('"'):
        s = json.loads(token)
        return lambda labels, value: s
    raise TemplateError(f"unsupported template argument {token!r} in {text!r} (use $labels.NAME or $value)")


def _compile_stage(tokens: list[str], prev: Callable, text: str) -> Callable[[Mapping[str, str], float], Any]:
    if tokens == ["humanize"]:
        return lambda labels, value: humanize(_to_float(prev(labels, value)))
    if tokens == ["humanizePercentage"]:
        return lambda labels, value: _go_g4(_to_float(prev(labels, value)) * 100) + "%"
    if tokens and tokens[0] == "printf":
        return _compile_printf(tokens[1:], prev, text)
    raise TemplateError(f"unsupported template function {' '.join(tokens)!r} in {text!r}")


def _compile_printf(tokens: list[str], piped: Callable | None, text: str) -> Callable[[Mapping[str, str], float], Any]:
    if not tokens or not tokens[0].startswith('"'):
        raise TemplateError(f'printf needs a quoted format, e.g. printf "%.2f" $value, in {text!r}')
    fmt = json.loads(tokens[0]).replace("%v", "%s")
    args = [_compile_arg(t, text) for t in tokens[1:]] + ([piped] if piped else [])

    def run(labels: Mapping[str, str], value: float) -> str:
        vals = tuple(a(labels, value) for a in args)
        if "%s" in fmt:  # %v / %s print floats the way Go does
            vals = tuple(_go_float(v) if isinstance(v, float) else v for v in vals)
        try:
            return fmt % vals
        except (TypeError, ValueError) as exc:
            raise TemplateError(f"printf {tokens[0]} failed in {text!r}: {exc}") from None

    return run


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _to_text(v: Any) -> str:
    return _go_float(v) if isinstance(v, float) else str(v)


def _go_float(v: float) -> str:
    """``v`` as Go's ``%v`` prints a float64 (what Prometheus shows for ``{{ $value }}``): 960, 1e-07, 1.234567e+06."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "0"
    d = Decimal(repr(v))  # repr gives the shortest round-trip digits, as Go does
    sign, digits, _ = d.normalize().as_tuple()
    ds = "".join(map(str, digits))
    exp = d.adjusted()
    neg = "-" if sign else ""
    if exp < -4 or exp >= 6:  # Go's shortest %g switches to e-notation here (strconv ftoa.go)
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp < 0:
        return f"{neg}0.{'0' * (-exp - 1)}{ds}"
    whole = ds[: exp + 1].ljust(exp + 1, "0")
    frac = ds[exp + 1 :]
    return f"{neg}{whole}.{frac}" if frac else f"{neg}{whole}"


def _go_g4(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return "%.4g" % v


def humanize(v: float) -> str:
    """Prometheus's ``humanize``: 4 significant digits with an SI prefix (1.234k, 960m, 1e-07 → 100n)."""
    if v == 0 or math.isnan(v) or math.isinf(v):
        return _go_g4(v)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
    else:
        for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
            if abs(v) >= 1:
                break
            prefix, v = p, v * 1000
    return _go_g4(v) + prefix
