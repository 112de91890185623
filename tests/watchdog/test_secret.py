"""Both sides read the shared command secret the same way: a file if named, else GRADWATCH_SECRET."""

import pytest

from gradwatch.watchdog.schema import read_secret
from gradwatch.watchdog.settings import Settings


def test_secret_from_file_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_SECRET", "from-env")
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert read_secret(str(path)) == b"from-file"
    assert read_secret() == b"from-env"
    assert Settings(secret_file=path).command_secret() == b"from-file"
    assert Settings().command_secret() == b"from-env"


def test_no_secret_and_an_empty_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_SECRET", raising=False)
    assert read_secret() is None and Settings().command_secret() is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_secret(str(empty))
