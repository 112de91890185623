"""The watchdog's own dead-man's switch: ``GradwatchWatchdog``, an alert that fires for as long as it is healthy.

Like kube-prometheus's ``Watchdog``: it is posted to every Alertmanager notifier at
each keep-alive while the service is healthy (the loop runs, the store can be
written), with severity ``none``. Alertmanager routes it to a dead-man's-switch
receiver (healthchecks.io, PagerDuty/Opsgenie heartbeats, a webhook that expects
it every few minutes). When the watchdog dies, hangs or cannot write its store,
the posts stop, Alertmanager resolves the alert at its ``endsAt`` and the
receiver, no longer hearing from it, pages someone.
"""

from __future__ import annotations

from gradwatch.watchdog.alert import Alert, AlertState

DEADMAN_RULE = "GradwatchWatchdog"


def deadman_alert(started_at: float) -> Alert:
    """The always-firing alert of a service started at ``started_at`` (its firing episode)."""
    return Alert(
        rule=DEADMAN_RULE,
        labels=(("alertname", DEADMAN_RULE), ("severity", "none")),
        annotations={
            "summary": "The gradwatch watchdog is alive.",
            "description": "Always firing while the watchdog runs and can write its store. Route it to a "
            "dead-man's-switch receiver: its absence means training runs are not being watched.",
        },
        state=AlertState.FIRING,
        value=1.0,
        active_at=started_at,
        fired_at=started_at,
    )
