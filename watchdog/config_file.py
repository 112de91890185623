"""The watchdog's YAML config file: the rules it evaluates and the notifiers it tells.

Read by ``gradwatch serve --config FILE`` before anything binds, again on every
reload (SIGHUP or ``POST /api/v1/rules/reload``), and by ``gradwatch rules check
FILE``. Every problem — in a rule, in a notifier, in the YAML itself — is reported
with its YAML path, line and reason by the rules loader's own machinery, so both
kinds of file read the same::

    rules:            # optional: without it, the built-in default pack
      - name: GradNormHigh
        kind: threshold
        ...
    notifiers:        # optional: without it, alerts are only kept and shown
      - type: slack
        url_env: SLACK_URL

A rules-only file is a valid config file. Other top-level keys are refused; new
sections (remediation ``policies:``) become new fields of :class:`WatchdogConfig`.
"""

from __future__ import annotations

import os

from pydantic import Field

from gradwatch.watchdog.notify.config import NOTIFIER_MODELS, Notifiers
from gradwatch.watchdog.rules.loader import RulesError, load_rules, parse_document, read_file
from gradwatch.watchdog.rules.models import RULE_MODELS, Rule, RulesFile

class ConfigError(RulesError):
    """A config file that cannot be used; ``problems`` lists every problem, ``report()`` prints them."""


def _default_rules() -> list[Rule]:
    return load_rules(None).rules


# Extends RulesFile so a rules-only file is a config file and rule names stay unique
# (RulesFile's validator) without a second copy of that check.
class WatchdogConfig(RulesFile):
    """The whole config file. Immutable; compare two to see what a reload changes."""

    rules: list[Rule] = Field(
        default_factory=_default_rules,
        description="Alert rules (see gradwatch.watchdog.rules.models). Omitted: the built-in default pack.",
    )
    notifiers: Notifiers = Field(
        default_factory=list,
        description="Where alerts are sent (see gradwatch.watchdog.notify.config). Omitted: nowhere.",
    )


def load_config(path: str | os.PathLike[str] | None = None) -> WatchdogConfig:
    """The config in file ``path``; ``None``: the default rule pack and no notifiers.

    Raises :class:`ConfigError` listing every problem (a Slack notifier without a URL,
    a ``url_env`` naming an unset variable, an unknown key, a bad rule...).
    """
    if path is None:
        return WatchdogConfig()
    source, text = read_file(path, ConfigError)
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> WatchdogConfig:
    """Validate YAML ``text`` as a config file; raises :class:`ConfigError`."""
    return parse_document(text, WatchdogConfig, source, tagged={**RULE_MODELS, **NOTIFIER_MODELS}, error=ConfigError)
