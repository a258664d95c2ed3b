"""The `loraforge` command follows the conventions of other CLIs: `-V`/`--version`, `-h`,
metavars instead of Python types, and usage errors as our `error:`/`fix:` lines with exit 1."""

from __future__ import annotations

import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.main
from conftest import assert_user_error, run_cli

from loraforge.cli import app, main

PYTHON_TYPES = re.compile(r"<(bool|int|str|float|path|list\[[a-z]+\])>|\{\w+\}")


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          *args: str) -> tuple[int, str, str]:
    """Run `loraforge ARGS` in this process; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["loraforge", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def _command_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]

    def walk(command: object, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                paths.append((*path, name))
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                 flag: str) -> None:
    code, out, _ = _main(monkeypatch, capsys, flag)
    assert code == 0
    assert out.strip() == f"loraforge {version('loraforge')}"


def test_every_help_shows_metavars_not_python_types(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    paths = _command_paths()
    assert ("slurm", "logs") in paths and ("pose", "random") in paths
    for path in paths:
        code, out, err = _main(monkeypatch, capsys, *path, "-h")
        assert code == 0, (path, err)
        assert f"Usage: {' '.join(('loraforge', *path))} [OPTIONS]" in out, (path, out)
        assert not PYTHON_TYPES.search(out), (path, PYTHON_TYPES.search(out), out)


def test_help_names_values_the_way_users_type_them(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, report, _ = _main(monkeypatch, capsys, "report", "--help")
    assert "Usage: loraforge report [OPTIONS] RUN" in report
    assert re.search(r"--set +KEY=VALUE", report) and re.search(r"--config +-c +FILE", report)
    _, logs, _ = _main(monkeypatch, capsys, "slurm", "logs", "-h")
    assert "Usage: loraforge slurm logs [OPTIONS] [RUN]" in logs
    _, runs, _ = _main(monkeypatch, capsys, "runs", "-h")
    json_row = next(line for line in runs.splitlines() if "--json" in line)
    assert re.search(r"--json +Print JSON", json_row), json_row  # a flag: no value shown
    _, pose, _ = _main(monkeypatch, capsys, "pose", "random", "-h")
    assert re.search(r"--pose-json +FILE", pose) and re.search(r"--seed +N ", pose)
    assert "--json" not in pose.replace("--pose-json", "")


@pytest.mark.parametrize(("args", "needles"), [
    (["generate", "--seed", "abc"], ["'--seed'", "integer", "usage: loraforge generate"]),
    (["dataset", "check", "--processes", "0"], ["'--processes'", "loraforge dataset check"]),
    (["report"], ["Missing argument 'RUN'", "usage: loraforge report [OPTIONS] RUN"]),
    (["runs", "--bogus"], ["No such option: --bogus", "`loraforge runs --help`"]),
    (["pose", "random", "-o", "x.png", "--json", "x.json"], ["--json", "loraforge pose random"]),
    (["trian"], ["No such command 'trian'", "`loraforge --help`"]),
])
def test_usage_errors_are_error_and_fix_lines_exit_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: list[str], needles: list[str]) -> None:
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 1, (out, err)
    assert err.startswith("error: ") and "\n  fix: usage: " in err, err
    assert "╭" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_usage_error_from_the_installed_command() -> None:
    result = run_cli("generate", "--seed", "abc", "--lora", "none")
    assert_user_error(result, "error: Invalid value for '--seed'", "fix: usage: loraforge generate")
    assert result.stdout == ""


@pytest.mark.parametrize("args", [[], ["slurm"]])
def test_a_command_group_alone_shows_its_help_and_exit_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: list[str]) -> None:
    code, out, err = _main(monkeypatch, capsys, *args)
    assert code == 1 and err == ""
    assert f"Usage: {' '.join(['loraforge', *args])} [OPTIONS] COMMAND [ARGS]..." in out


def test_a_deleted_current_folder_is_one_message(tmp_path: Path) -> None:
    """A shell left in a folder that was deleted: a project command says so, no traceback."""
    import subprocess

    folder = tmp_path / "gone"
    folder.mkdir()
    script = f'cd "{folder}" && rmdir "{folder}" && exec "{sys.executable}" -m loraforge runs'
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    assert_user_error(result, "the current folder no longer exists", "cd to your project")
