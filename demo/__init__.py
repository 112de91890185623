"""Runnable demonstrations of gradwatch on real (small, generated-data) training runs."""
