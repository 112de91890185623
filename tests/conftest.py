"""Shared fixtures. Kept minimal; helpers live in tests/receiver.py and tests/integration/servers.py."""

from __future__ import annotations

import sys

import pytest

from tests.receiver import Receiver


@pytest.fixture
def receiver():
    """A started local HTTP receiver on 127.0.0.1 (see tests/receiver.py), stopped after the test."""
    with Receiver() as r:
        yield r


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # torch is much slower with 2 intra-op threads on these 2-core machines (FIELD_NOTES §2).
    # Only if a test module already imported it: watchdog tests must not pay for importing torch.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    yield
