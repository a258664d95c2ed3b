"""Shared fixtures: run the real CLI in a subprocess, and build the tiny model once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 600,
            ) -> subprocess.CompletedProcess[str]:
    """Run `loraforge ARGS` as a user would, in a fresh process; return its exit code and output."""
    full_env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_STORAGE_ROOT"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "loraforge", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A bad input: exit code 1, a message containing every needle, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage root holding the embedded tiny base model and ControlNet, built once."""
    from loraforge.models.tiny import ensure_tiny_models

    root = tmp_path_factory.mktemp("store")
    ensure_tiny_models(root)
    return root
