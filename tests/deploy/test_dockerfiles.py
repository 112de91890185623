"""The container files, read as text (no Docker engine runs here, so nothing is built).

The watchdog image must stay slim: python:3.11-slim, only ``gradwatch[watchdog]``
installed (and that extra must not pull torch in), a non-root user, port 9400, a
healthcheck on /healthz. Both images copy only paths that exist.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gradwatch.watchdog.settings import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
WATCHDOG = ROOT / "deploy" / "watchdog.Dockerfile"
TRAINER = ROOT / "deploy" / "compose" / "trainer" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def of(path: Path, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(path) if kw == keyword]


def test_watchdog_image_is_python_slim_in_every_stage():
    bases = of(WATCHDOG, "FROM")
    assert bases and all(base.split()[0] == "python:3.11-slim" for base in bases)


def test_watchdog_image_installs_the_watchdog_extra_and_never_torch():
    installs = [run for run in of(WATCHDOG, "RUN") if re.search(r"pip (install|wheel)", run)]
    assert installs
    for run in installs:
        pip_part = run.split("&&")[0]
        assert "torch" not in pip_part and "[agent" not in pip_part and "dev]" not in pip_part, run
        assert "[watchdog]" in pip_part, run
    # The extra itself must not bring torch in.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["watchdog"]
    assert not [r for r in requirements if re.match(r"torch\b", r)], requirements
    # And the build fails if torch ever shows up anyway.
    assert any("find_spec('torch')" in run for run in of(WATCHDOG, "RUN"))


@pytest.mark.parametrize("dockerfile", [WATCHDOG, TRAINER], ids=["watchdog", "trainer"])
def test_images_run_as_a_non_root_user(dockerfile):
    users = of(dockerfile, "USER")
    assert users, f"{dockerfile.name}: no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    # The last USER comes after the last RUN that installs anything.
    kinds = [kw for kw, _ in instructions(dockerfile)]
    assert max(i for i, kw in enumerate(kinds) if kw == "USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN")


def test_watchdog_image_listens_on_9400_and_checks_healthz():
    assert of(WATCHDOG, "EXPOSE") == [str(DEFAULT_PORT)]
    (healthcheck,) = of(WATCHDOG, "HEALTHCHECK")
    assert f"127.0.0.1:{DEFAULT_PORT}/healthz" in healthcheck
    env = " ".join(of(WATCHDOG, "ENV"))
    assert "GRADWATCH_HOST=0.0.0.0" in env and f"GRADWATCH_PORT={DEFAULT_PORT}" in env
    assert of(WATCHDOG, "ENTRYPOINT") == ['["gradwatch"]'] and of(WATCHDOG, "CMD") == ['["serve"]']


@pytest.mark.parametrize("dockerfile", [WATCHDOG, TRAINER], ids=["watchdog", "trainer"])
def test_copied_paths_exist_in_the_build_context(dockerfile):
    for args in of(dockerfile, "COPY"):
        if args.startswith("--from="):
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
    # The per-Dockerfile ignore file keeps .venv, .git etc. out of the context but lets these in.
    assert Path(f"{dockerfile}.dockerignore").is_file()
