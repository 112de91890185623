"""gradwatch.watchdog — the service that evaluates alert rules, notifies and remediates.

Kept import-light on purpose: the agent imports the wire schema and metric names
from this package, so nothing here may pull in the web stack or torch.
"""
