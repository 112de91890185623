"""Load a rules file, or say everything wrong with it and where.

``load_rules`` reads a rules-only file (or the built-in pack); the watchdog's own
config file (:mod:`gradwatch.watchdog.config_file`) embeds rules beside other
sections and goes through :func:`parse_document` and :func:`validation_problems`
too, so every problem in either file is reported the same way: YAML path, line,
reason.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gradwatch.watchdog.rules.models import RULE_MODELS, RulesFile

DEFAULT_RULES = "default.yaml"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where (YAML path, 1-based line if known) and why."""

    location: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.location} (line {self.line})" if self.line else self.location
        return f"{where}: {self.reason}"


class RulesError(ValueError):
    """A rules file that cannot be used; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem], source: str = "<rules>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.report())

    def report(self) -> str:
        n = len(self.problems)
        lines = [f"{self.source}: {n} problem{'' if n == 1 else 's'}"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


def load_rules(path_or_text: str | os.PathLike[str] | None = None) -> RulesFile:
    """The rules in a file, in YAML text, or (``None``) the built-in default pack.

    A ``str`` holding a newline is YAML text; any other ``str`` or path is a file name.
    Raises :class:`RulesError` listing every problem.
    """
    if path_or_text is None:
        text = default_rules_text()
        return parse_rules(text, source=f"{DEFAULT_RULES} (built-in)")
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return parse_rules(path_or_text)
    path, text = read_file(path_or_text)
    return parse_rules(text, source=path)


def read_file(path: str | os.PathLike[str], error: type[RulesError] = RulesError) -> tuple[str, str]:
    """(source name, text) of a rules or config file; raises ``error`` naming the file if it cannot be read."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            return source, f.read()
    except OSError as exc:
        raise error([Problem("<file>", f"cannot read: {exc.strerror or exc}")], source=source) from None


def default_rules_text() -> str:
    """The default rule pack shipped inside the package."""
    return resources.files("gradwatch.watchdog.rules").joinpath(DEFAULT_RULES).read_text(encoding="utf-8")


def parse_rules(text: str, source: str = "<string>") -> RulesFile:
    """Validate YAML ``text`` as a rules file; raises :class:`RulesError`."""
    return parse_document(text, RulesFile, source)


Doc = TypeVar("Doc", bound=BaseModel)


def parse_document(
    text: str,
    model: type[Doc],
    source: str = "<string>",
    *,
    tagged: Mapping[str, type[BaseModel]] = RULE_MODELS,
    error: type[RulesError] = RulesError,
) -> Doc:
    """Validate YAML ``text`` as ``model`` (a rules file, or a config embedding ``rules:``).

    Raises ``error`` (a :class:`RulesError`) listing every problem. ``tagged`` maps each
    discriminator value a union in ``model`` can take (rule kinds, notifier types) to
    its model, so an unknown key inside one can be answered with the keys it allows.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error([_yaml_problem(exc)], source=source) from None
    problems = duplicate_keys(root)
    if not isinstance(data, dict):
        keys = ", ".join(f"`{k}`" for k in _keys(model))
        problems.append(Problem("<root>", f"expected a mapping with {keys}", _line(root)))
        raise error(problems, source=source)
    try:
        doc = model.model_validate(data)
    except ValidationError as exc:
        problems += validation_problems(exc, text, root=root, model=model, tagged=tagged)
        # pydantic checks names only once every rule is valid; report duplicates anyway
        known = {p.location for p in problems}
        problems += [p for p in duplicate_names(data, root) if p.location not in known]
    if problems:
        raise error(sorted(problems, key=lambda p: (p.line or 0, p.location)), source=source)
    return doc


# --- locating problems ---------------------------------------------------------------------


def validation_problems(
    exc: ValidationError,
    source_text: str | None = None,
    *,
    root: yaml.Node | None = None,
    model: type[BaseModel] = RulesFile,
    tagged: Mapping[str, type[BaseModel]] = RULE_MODELS,
) -> list[Problem]:
    """Every error in ``exc`` as a :class:`Problem` located in ``source_text`` (the YAML that was validated).

    Locations are YAML paths (``rules[2].for``) — pydantic's internal steps such as the
    rule kind or notifier type a union tried are left out — with the line of the
    offending key. ``model`` is what was validated at the root (its keys are listed for
    an unknown top-level key); ``tagged`` as for :func:`parse_document`.
    """
    if root is None and source_text is not None:
        try:
            root = yaml.compose(source_text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
        path, line = _resolve(root, loc, tagged)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append(_discriminator(err))
        problems.append(Problem(format_path(path), _reason(err, loc, model, tagged), line))
    return problems


def format_path(path: Sequence[str | int]) -> str:
    """``["rules", 2, "for"]`` → ``rules[2].for``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "<root>"


def _resolve(
    node: yaml.Node | None, loc: tuple, tagged: Mapping[str, type[BaseModel]] = RULE_MODELS
) -> tuple[list[str | int], int | None]:
    """Follow ``loc`` through the YAML node tree: the path that exists in the file, and its line."""
    path: list[str | int] = []
    line = _line(node)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if part == "[key]":  # pydantic's marker for a bad mapping key: the key itself is the location
            continue
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
            if hit is not None:
                path.append(part)
                line, node = _line(hit[0]), hit[1]
                continue
            if last and part not in tagged:  # a missing key: name it, point at its mapping
                path.append(part)
            continue  # otherwise a union tag or validator name: not part of the file
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            path.append(part)
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = _line(node)
            continue
        if isinstance(part, int) or last:
            path.append(part)
    return path, line


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _discriminator(err: Any) -> str:
    """The key a tagged union is chosen by (``kind`` for rules, ``type`` for notifiers)."""
    return str((err.get("ctx") or {}).get("discriminator", "kind")).strip("'")


def _reason(err: Any, loc: tuple, model: type[BaseModel], tagged: Mapping[str, type[BaseModel]]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc, model, tagged)
        if not allowed:
            return f"unknown key {key!r}"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key!r} ({hint}allowed: {', '.join(allowed)})"
    if kind == "union_tag_invalid":
        expected = str(ctx.get("expected_tags", "")).replace("'", "")
        return f"unknown {_discriminator(err)} {ctx.get('tag')!r}: expected one of {expected}"
    if kind == "union_tag_not_found":
        key = _discriminator(err)
        return f"missing `{key}`: one of {', '.join(t for t, m in tagged.items() if key in m.model_fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind != "rule_invalid" and isinstance(value, str | int | float | bool) and kind != "duration":
        msg += f" (got {value!r})"
    return msg


def _allowed_keys(loc: tuple, model: type[BaseModel], tagged: Mapping[str, type[BaseModel]]) -> list[str]:
    """Keys accepted where the unknown key sits: directly in a tagged model (a rule kind), or at the root."""
    if len(loc) >= 2 and loc[-2] in tagged:
        return _keys(tagged[loc[-2]])
    if len(loc) == 1:
        return _keys(model)
    return []


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def duplicate_keys(node: yaml.Node | None, path: tuple = ()) -> list[Problem]:
    """Keys given twice in one mapping (YAML keeps the last silently; we refuse the file)."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int | None] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            if key in seen:
                reason = f"duplicate key {key!r} (first on line {seen[key]})"
                problems.append(Problem(format_path([*path, key]), reason, _line(k)))
            seen.setdefault(key, _line(k))
            problems += duplicate_keys(v, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += duplicate_keys(item, (*path, i))
    return problems


def duplicate_names(data: dict, root: yaml.Node | None) -> list[Problem]:
    """Rule names used twice, read from the raw data (so they show up beside other errors)."""
    first: dict[str, int] = {}
    problems = []
    rules = data.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        name = rule.get("name") if isinstance(rule, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            path, line = _resolve(root, ("rules", i, "name"))
            reason = f"duplicate rule name {name!r} (first used by rules[{first[name]}])"
            problems.append(Problem(format_path(path), reason, line))
        first.setdefault(name, i)
    return problems


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    reason = " ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x) or str(exc)
    return Problem("<yaml>", f"not valid YAML: {reason}", mark.line + 1 if mark else None)
