"""Fault and load scenarios for ``benchmarks/fault_load.py``, one module per area.

Each module exposes ``run(quick: bool) -> list[Row]``; a Row is a dict with ``scenario``,
``measure``, ``value`` (str), ``goal`` (str or "") and ``met`` (True/False/None).
"""
