"""Notifier settings as they appear under ``notifiers:`` in the watchdog's YAML config.

Checked when the config is loaded, so a bad notifier stops the service at start-up
with the field and the fix instead of failing silently at the first alert. Every
secret (URL with a token, HMAC secret, bearer token, password) may be given
inline or by naming an environment variable with the ``<field>_env`` key, e.g.
``url_env: SLACK_URL``; the variable is read at load time and must be set.

Example::

    notifiers:
      - type: alertmanager
        url: http://alertmanager:9093
      - type: webhook
        name: ops-hook
        url: https://hooks.example.org/gradwatch
        secret_env: GRADWATCH_WEBHOOK_SECRET
        headers: {X-Team: ml-infra}
      - type: slack
        url_env: SLACK_URL
        channel: "#training-alerts"
        repeat_interval: 2h
        send_resolved: true
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    TypeAdapter,
    field_validator,
    model_validator,
)

from gradwatch.watchdog.durations import PositiveSeconds


class _Section(BaseModel):
    """Strict, immutable config model that resolves ``<field>_env`` keys from the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _read_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in [k for k in data if isinstance(k, str) and k.endswith("_env")]:
            target = key[: -len("_env")]
            if target not in cls.model_fields:
                continue  # left in place: extra="forbid" names the unknown key
            var = data.pop(key)
            if data.get(target) is not None:
                raise ValueError(f"give {target!r} or {key!r}, not both")
            value = os.environ.get(str(var), "")
            if not value:
                raise ValueError(f"{key}: environment variable {var!r} is not set or empty (it should hold {target!r})")
            data[target] = value
        return data


class BasicAuth(_Section):
    username: str
    password: SecretStr = Field(description="Or `password_env: VAR`.")


class _NotifierBase(_Section):
    name: str = Field(
        default="", min_length=1, description="Unique among notifiers; defaults to the type. Appears in the audit log and metrics."
    )
    send_resolved: bool = Field(
        default=True, description="Also notify when an alert resolves (only alerts this notifier was told about)."
    )
    repeat_interval: PositiveSeconds = Field(
        default=4 * 3600.0, description="Re-send a still-firing alert after this long (Alertmanager's repeat_interval)."
    )
    timeout: PositiveSeconds = Field(default=10.0, description="HTTP timeout of one delivery attempt.")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("type"), str):
            data = {**data, "name": data["type"]}
        return data


# Alertmanager drops an alert whose endsAt has passed; the notifier sets endsAt to
# this many repeat intervals ahead, so a few lost posts do not resolve it, and an
# alert whose watchdog died resolves itself in Alertmanager soon after.
ALERTMANAGER_VALIDITY_FACTOR = 4
_ALERTMANAGER_MAX_REPEAT_S = 300.0


class AlertmanagerConfig(_NotifierBase):
    """Posts to Alertmanager's API v2, which then groups, routes and re-notifies humans."""

    type: Literal["alertmanager"]
    url: HttpUrl = Field(description="Alertmanager base URL, e.g. http://alertmanager:9093 (alerts go to <url>/api/v2/alerts).")
    basic_auth: BasicAuth | None = None
    bearer_token: SecretStr | None = Field(default=None, description="Or `bearer_token_env: VAR`.")
    repeat_interval: PositiveSeconds = Field(
        default=60.0,
        description="How often a firing alert is re-posted to keep it alive in Alertmanager (at most 5m). "
        "How often humans are re-notified is Alertmanager's own route repeat_interval.",
    )

    @field_validator("repeat_interval")
    @classmethod
    def _keep_alive(cls, v: float) -> float:
        if v > _ALERTMANAGER_MAX_REPEAT_S:
            raise ValueError(
                "for an alertmanager notifier repeat_interval is the keep-alive re-post period and must be at most 5m; "
                "set the human re-notification period as repeat_interval in Alertmanager's route"
            )
        return v

    @model_validator(mode="after")
    def _one_auth(self) -> AlertmanagerConfig:
        if self.basic_auth is not None and self.bearer_token is not None:
            raise ValueError("give basic_auth or bearer_token, not both")
        return self


class WebhookConfig(_NotifierBase):
    """POSTs an Alertmanager-webhook-v4-shaped JSON document to any HTTP endpoint."""

    type: Literal["webhook"]
    url: HttpUrl = Field(description="Or `url_env: VAR`.")
    secret: SecretStr | None = Field(
        default=None,
        description="If set, the body is signed: header X-Gradwatch-Signature: sha256=<hex HMAC-SHA256 of the raw body>. "
        "Or `secret_env: VAR`.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")


class SlackConfig(_NotifierBase):
    """Posts a readable message to a Slack incoming webhook."""

    type: Literal["slack"]
    url: SecretStr | None = Field(default=None, description="The incoming-webhook URL (a secret). Or `url_env: VAR`.")
    channel: str | None = Field(default=None, description="Override the webhook's channel (legacy webhooks only).")
    username: str | None = Field(default=None, description="Override the poster's name (legacy webhooks only).")

    @model_validator(mode="after")
    def _url_required(self) -> SlackConfig:
        # Checked here rather than by making the field required, so the message can
        # say what to do instead of pydantic's bare "Field required".
        if self.url is None:
            raise ValueError(
                f"slack notifier {self.name!r} has no url: set `url:` to the Slack incoming-webhook URL "
                "or `url_env:` to the environment variable holding it"
            )
        if not re.match(r"^https?://[^\s/]+", self.url.get_secret_value()):
            raise ValueError(f"slack notifier {self.name!r}: url must be an http(s) URL (https://hooks.slack.com/services/...)")
        return self


NotifierConfig = Annotated[Union[AlertmanagerConfig, WebhookConfig, SlackConfig], Field(discriminator="type")]
NOTIFIER_MODELS: dict[str, type[_NotifierBase]] = {
    "alertmanager": AlertmanagerConfig,
    "webhook": WebhookConfig,
    "slack": SlackConfig,
}
"""Each ``type`` and its model (for messages such as the keys a type allows)."""


def _unique_names(configs: list[NotifierConfig]) -> list[NotifierConfig]:
    seen: set[str] = set()
    for c in configs:
        if c.name in seen:
            raise ValueError(f"two notifiers are named {c.name!r}: give each a distinct `name:`")
        seen.add(c.name)
    return configs


Notifiers = Annotated[list[NotifierConfig], AfterValidator(_unique_names)]
"""The type of the top-level ``notifiers:`` list; embed it in the service's config model."""

_NOTIFIERS = TypeAdapter(Notifiers, config=ConfigDict(title="notifiers"))


def parse_notifiers(data: Any) -> list[NotifierConfig]:
    """Validate the ``notifiers:`` list (already loaded from YAML); raises pydantic.ValidationError."""
    return _NOTIFIERS.validate_python(data if data is not None else [])


def build_notifier(config: NotifierConfig, external_url: str = ""):
    """The notifier object for one validated config. ``external_url`` is the watchdog's own URL (for links)."""
    # Imported here: the notifier modules import this one for their config types.
    from gradwatch.watchdog.notify.alertmanager import AlertmanagerNotifier
    from gradwatch.watchdog.notify.slack import SlackNotifier
    from gradwatch.watchdog.notify.webhook import WebhookNotifier

    cls = {"alertmanager": AlertmanagerNotifier, "webhook": WebhookNotifier, "slack": SlackNotifier}[config.type]
    return cls(config, external_url=external_url)
