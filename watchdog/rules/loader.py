"""Load a rules file, or say everything wrong with it and where.

``load_rules`` is what the service calls at start and on reload (a :class:`RulesError`
keeps the old rules in place) and what ``gradwatch rules check FILE`` prints.
:func:`validation_problems` turns any pydantic error into located problems, so a
combined config file that embeds rules reports them the same way.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from pydantic import ValidationError

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
    path = os.fspath(path_or_text)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise RulesError([Problem("<file>", f"cannot read: {exc.strerror or exc}")], source=path) from None
    return parse_rules(text, source=path)


def default_rules_text() -> str:
    """The default rule pack shipped inside the package."""
    return resources.files("gradwatch.watchdog.rules").joinpath(DEFAULT_RULES).read_text(encoding="utf-8")


def parse_rules(text: str, source: str = "<string>") -> RulesFile:
    """Validate YAML ``text`` as a rules file; raises :class:`RulesError`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError([_yaml_problem(exc)], source=source) from None
    problems = duplicate_keys(root)
    if not isinstance(data, dict):
        problems.append(Problem("<root>", "expected a mapping with a `rules` list", _line(root)))
        raise RulesError(problems, source=source)
    try:
        rules = RulesFile.model_validate(data)
    except ValidationError as exc:
        problems += validation_problems(exc, text, root=root)
        # pydantic checks names only once every rule is valid; report duplicates anyway
        known = {p.location for p in problems}
        problems += [p for p in duplicate_names(data, root) if p.location not in known]
    if problems:
        raise RulesError(sorted(problems, key=lambda p: (p.line or 0, p.location)), source=source)
    return rules


# --- locating problems ---------------------------------------------------------------------


def validation_problems(
    exc: ValidationError, source_text: str | None = None, *, root: yaml.Node | None = None
) -> list[Problem]:
    """Every error in ``exc`` as a :class:`Problem` located in ``source_text`` (the YAML that was validated).

    Locations are YAML paths (``rules[2].for``) — pydantic's internal steps such as the
    rule kind a union tried are left out — with the line of the offending key.
    """
    if root is None and source_text is not None:
        try:
            root = yaml.compose(source_text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
        path, line = _resolve(root, loc)
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append("kind")
        problems.append(Problem(format_path(path), _reason(err, loc), line))
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


def _resolve(node: yaml.Node | None, loc: tuple) -> tuple[list[str | int], int | None]:
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
            if last and part not in RULE_MODELS:  # a missing key: name it, point at its mapping
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


def _reason(err: Any, loc: tuple) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc)
        if not allowed:
            return f"unknown key {key!r}"
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key!r} ({hint}allowed: {', '.join(allowed)})"
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r}: expected one of {', '.join(RULE_MODELS)}"
    if kind == "union_tag_not_found":
        return f"missing `kind`: one of {', '.join(RULE_MODELS)}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if kind != "rule_invalid" and isinstance(value, str | int | float | bool) and kind != "duration":
        msg += f" (got {value!r})"
    return msg


def _allowed_keys(loc: tuple) -> list[str]:
    """Keys the rule kind named in ``loc`` accepts, when the unknown key sits directly in a rule."""
    if len(loc) >= 2 and loc[-2] in RULE_MODELS:
        model = RULE_MODELS[loc[-2]]
        return [f.alias or name for name, f in model.model_fields.items()]
    if len(loc) == 1:
        return list(RulesFile.model_fields)
    return []


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
