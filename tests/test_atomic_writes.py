"""Atomic writes (fsutil): a file is written under a hidden temporary name beside it, then
renamed; what a user sees of that is only its limits."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli


def test_a_name_near_the_file_systems_limit_is_written(tmp_path: Path) -> None:
    """A 244-byte name (the limit is 255) failed with "File name too long": the temporary
    name beside it is 14 bytes longer. Also for a name of multi-byte characters."""
    for stem in ("a" * 240, "é" * 120):
        out = tmp_path / f"{stem}.png"
        result = run_cli("pose", "random", "-o", out, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert out.is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
