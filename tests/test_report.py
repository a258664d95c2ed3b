"""`report.html`: loss history reading, the loss chart, a self-contained page that links only
files that exist and escapes user text, and `report_command`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.report.chart import loss_chart, nice_ticks
from loraforge.report.command import report_command
from loraforge.report.html import read_history, write_report
from loraforge.train.previews import (
    defaults_from_config,
    parse_sample_prompts,
    preview_path,
    write_grid,
)

RUN = "blake_v2"
PROMPTS = ["blake, standing --w 256 --h 256", "<b>mage</b> & knight --n <script>x</script>"]


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [value for name, value in attrs if name in {"src", "href"} and value]


def _history(steps: int, per_epoch: int) -> list[dict[str, object]]:
    out, ema = [], None
    for step in range(1, steps + 1):
        loss = 0.2 + 0.1 / step + 0.02 * ((step * 7919) % 13) / 13
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        out.append({"step": step, "epoch": (step - 1) // per_epoch + 1, "loss": loss,
                    "loss_smoothed": ema, "lr": [1e-4, 5e-5]})
    return out


def make_run(storage: Path, *, epochs: int = 3, dataset_json: bool = True,
             history: bool = True, samples: bool = True) -> Path:
    """A finished run as the trainer leaves it: run.json, LoRA files (epoch 1 pruned), history,
    dataset.json, previews and grids."""
    run_dir = storage / "Multi_Concept_Output" / RUN
    run_dir.mkdir(parents=True)
    config = load_settings(None, [f"storage.root={storage}", "dataset.resolution=256"]).to_dict()
    config["train"]["sample_prompts"] = PROMPTS
    record = {"name": RUN, "status": "finished", "config": config, "step": 30,
              "total_steps": 30, "final_loss": 0.21, "started_at_unix": 1767225600,
              "finished_at": "2026-01-01T01:00:00+0000", "epochs": epochs,
              "steps_per_epoch": 10, "device": "cpu",
              "dataset": {"concepts": {"20_blake": {"n_repeats": 20, "img_count": 4},
                                       "10_<script>alert(1)</script>": {"n_repeats": 10,
                                                                         "img_count": 2}},
                          "images": 6, "images_x_repeats": 100}}
    (run_dir / "run.json").write_text(json.dumps(record))
    for epoch in range(2, epochs):
        (run_dir / f"{RUN}-{epoch:06d}.safetensors").write_bytes(b"x" * 100)
    (run_dir / f"{RUN}.safetensors").write_bytes(b"y" * 100)
    if dataset_json:
        (run_dir / "dataset.json").write_text(json.dumps({"concepts": [
            {"name": "blake", "folder": "20_blake", "images": 4, "captioned": 4, "repeats": 20,
             "images_x_repeats": 80,
             "top_tags": [{"tag": "blake", "count": 4}, {"tag": "<script>", "count": 2}],
             "buckets": {"512x512": 3, "448x576": 1}},
            {"name": "mage", "folder": "10_mage", "images": 2, "captioned": 1, "repeats": 10,
             "images_x_repeats": 20, "top_tags": [], "buckets": {"512x512": 2}}]}))
    if history:
        lines = [json.dumps(h) for h in _history(30, 10)]
        (run_dir / "history.jsonl").write_text("\n".join(lines) + "\n")
    if samples:
        prompts = parse_sample_prompts(PROMPTS, defaults_from_config(config))
        for epoch in range(1, epochs + 1):
            for index, prompt in enumerate(prompts):
                path = preview_path(run_dir, epoch, index, prompt)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (prompt.width, prompt.height), (30 * epoch, 90, 150)).save(path)
            write_grid(run_dir, prompts, epoch)
    return run_dir


def _check_links(report: Path) -> Links:
    parser = Links()
    parser.feed(report.read_text(encoding="utf-8"))
    assert parser.links
    for link in parser.links:
        assert "://" not in link and not link.startswith(("/", "//")), link
        assert (report.parent / unquote(link)).is_file(), link
    return parser


# --- history -------------------------------------------------------------------------------
def test_history_keeps_the_last_occurrence_of_each_step(tmp_path: Path) -> None:
    first = [{"step": s, "epoch": 1, "loss": 1.0, "loss_smoothed": 1.0, "lr": [1e-4]}
             for s in range(1, 6)]
    resumed = [{"step": s, "epoch": 1, "loss": 2.0, "loss_smoothed": 2.0, "lr": [1e-4]}
               for s in range(4, 8)]
    text = "\n".join(json.dumps(h) for h in first + resumed) + '\n{"step": 8, "epo'
    (tmp_path / "history.jsonl").write_text(text)
    history = read_history(tmp_path)
    assert [h["step"] for h in history] == list(range(1, 8))
    assert [h["loss"] for h in history] == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]


def test_history_drops_the_stale_tail_of_an_interrupted_attempt(tmp_path: Path) -> None:
    steps = [1, 2, 3, 4, 5, 6, 3, 4]  # resumed at 2, interrupted again after 4
    lines = [json.dumps({"step": s, "loss": float(i)}) for i, s in enumerate(steps)]
    (tmp_path / "history.jsonl").write_text("\n".join(["[1]", "garbage", *lines]))
    assert [(h["step"], h["loss"]) for h in read_history(tmp_path)] == \
        [(1, 0.0), (2, 1.0), (3, 6.0), (4, 7.0)]
    assert read_history(tmp_path / "missing") == []


# --- chart ---------------------------------------------------------------------------------
def test_chart_of_one_point() -> None:
    image = loss_chart([{"step": 1, "epoch": 1, "loss": 0.3, "loss_smoothed": 0.3}])
    assert image.size == (800, 300)
    assert len(image.getcolors(1 << 16) or []) > 2


def test_chart_of_many_points_is_deterministic() -> None:
    history = _history(5000, 500)
    history[10]["loss"] = float("nan")
    first, second = loss_chart(history), loss_chart(history, 800, 300)
    assert first.size == (800, 300)
    assert first.tobytes() == second.tobytes()
    assert loss_chart([]).size == (800, 300)
    assert loss_chart([{"step": s, "loss": 0.5} for s in range(3)], 400, 200).size == (400, 200)


def test_nice_ticks() -> None:
    assert nice_ticks(0, 100, 5) == [0, 25, 50, 75, 100]
    assert nice_ticks(1, 5, 5, integer=True) == [1, 2, 3, 4, 5]
    assert nice_ticks(1, 7, 6, integer=True) == [2, 4, 6]
    assert all(float(t).is_integer() for t in nice_ticks(1, 5000, 6, integer=True))


# --- report --------------------------------------------------------------------------------
def test_report_is_self_contained_and_links_only_existing_files(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    report = write_report(run_dir)
    assert report == run_dir / "report.html"
    assert (run_dir / "report-loss.png").is_file()
    text = report.read_text(encoding="utf-8")
    parser = _check_links(report)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "report-loss.png" in parser.links
    assert f"{RUN}.safetensors" in parser.links and f"{RUN}-000002.safetensors" in parser.links
    assert "samples/grid-epoch-003.png" in parser.links
    assert "samples/epoch-001/0-blake-standing.png" in parser.links
    assert "<details>" in text and "sample_steps" in text
    assert not list(run_dir.glob(".*.tmp"))


def test_user_text_is_escaped(tmp_path: Path) -> None:
    text = write_report(make_run(tmp_path)).read_text(encoding="utf-8")
    assert "<script>" not in text
    assert "&lt;script&gt;" in text
    assert "&lt;b&gt;mage&lt;/b&gt; &amp; knight" in text
    # The top tags as dataset.json holds them, shown as tag and count.
    assert 'blake&nbsp;<span class="muted">4</span>' in text and "&#x27;tag&#x27;" not in text


def test_report_without_history_samples_or_dataset_json(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, dataset_json=False, history=False, samples=False)
    report = write_report(run_dir, 0o600)
    assert report.stat().st_mode & 0o777 == 0o600
    assert not (run_dir / "report-loss.png").exists()
    parser = _check_links(report)
    assert parser.links == [f"{RUN}.safetensors", f"{RUN}-000002.safetensors"]
    text = report.read_text(encoding="utf-8")
    assert "20_blake" in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "no loss history yet" in text


def test_report_of_a_bare_folder(tmp_path: Path) -> None:
    report = write_report(tmp_path)
    assert report.is_file() and tmp_path.name in report.read_text(encoding="utf-8")
    (tmp_path / "run.json").write_text('{"status": "fin')  # cut short
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "damaged" in text and "run.json cannot be read (not JSON" in text
    assert "unknown" not in text


# --- command -------------------------------------------------------------------------------
def _config(tmp_path: Path, storage: Path) -> Path:
    config = tmp_path / "forge.toml"
    config.write_text(f'[storage]\nroot = "{storage}"\n')
    return config


def test_report_command_writes_and_prints_the_report(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFORGE_STORAGE_ROOT", raising=False)
    run_dir = make_run(tmp_path / "store")
    report_command(RUN, config=_config(tmp_path, tmp_path / "store"))
    assert str(run_dir / "report.html") in capsys.readouterr().out
    _check_links(run_dir / "report.html")


def test_report_command_lists_runs_when_the_run_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAFORGE_STORAGE_ROOT", raising=False)
    make_run(tmp_path / "store", samples=False)
    config = _config(tmp_path, tmp_path / "store")
    with pytest.raises(ForgeError) as info:
        report_command("nope", config=config)
    assert "nope" in str(info.value) and RUN in str(info.value)
    with pytest.raises(ForgeError, match="not allowed"):
        report_command("x y", config=config)
    with pytest.raises(ForgeError, match="is not a run folder of this project"):
        report_command("../x", config=config)
    with pytest.raises(ForgeError, match="none yet"):
        report_command("nope", overrides=[f"storage.root={tmp_path / 'empty'}"],
                       config=config)


def test_report_command_module_imports_light() -> None:
    code = ("import sys, loraforge.report.command; "
            "heavy = {'PIL', 'numpy', 'torch', 'pydantic'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- names that are not UTF-8, and a report that cannot be written ---------------------------
def test_a_concept_folder_that_is_not_utf8_is_shown_escaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder unzipped from a Windows zip (`caf\\xe9_mage`, latin-1): the report's write raised
    UnicodeEncodeError, which ended the training at its first epoch."""
    run_dir = make_run(tmp_path, samples=False)
    name = os.fsdecode(b"10_caf\xe9_mage")
    record = json.loads((run_dir / "run.json").read_text())
    record["dataset"]["concepts"][name] = {"n_repeats": 10, "img_count": 2}
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "dataset.json").unlink()
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "10_caf\\xe9_mage" in text
    monkeypatch.delenv("LORAFORGE_STORAGE_ROOT", raising=False)
    report_command(RUN, overrides=[f"storage.root={tmp_path}"])


def test_a_report_that_fails_is_a_warning_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from loraforge.train.trainer import Trainer

    def broken(_run_dir: Path, _mode: int) -> Path:
        raise UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed")

    Trainer.write_report(SimpleNamespace(report=broken, run_dir=tmp_path, mode=0o644))
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "report.html not written (training goes on): UnicodeEncodeError" in warning.message


# --- the report of a run that stops, fails or starts over ------------------------------------
def test_the_report_says_how_an_attempt_ended_and_restart_replaces_the_old_one(
        tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --restart` deleted the LoRA files and separation.json, but report.html still said
    finished, 140/140, and linked them; a stopped or failed attempt's report said running. No
    training here: the trainer stops (or fails) as it would start its first step."""
    from conftest import write_training_project

    from loraforge.train.run import train
    from loraforge.train.signals import Interrupted
    from loraforge.train.trainer import Trainer

    settings = load_settings(write_training_project(tmp_path, tiny_store))
    run_dir = settings.runs_dir / "again"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "again", "status": "finished",
                                                  "step": 140, "total_steps": 140}))
    (run_dir / "again.safetensors").write_bytes(b"y" * 100)
    (run_dir / "separation.json").write_text(json.dumps({"concepts": [
        {"name": "old", "trigger": "old", "images": 1, "loss": {"old": 0.5}, "no_lora": 0.6}]}))
    (run_dir / "history.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    write_report(run_dir)
    assert "status-finished" in (run_dir / "report.html").read_text(encoding="utf-8")

    def stopped(*_args: object) -> Path:
        raise Interrupted(saved=False)

    monkeypatch.setattr(Trainer, "run", stopped)
    with pytest.raises(Interrupted):
        train(settings, "again", restart=True, report=write_report)
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "status-interrupted" in text and "step 140" not in text
    assert "again.safetensors" not in text and "Concept separation" not in text
    assert not (run_dir / "report-loss.png").exists()

    def failed(*_args: object) -> Path:
        raise ForgeError("the base model cannot be read", path=run_dir)

    monkeypatch.setattr(Trainer, "run", failed)
    with pytest.raises(ForgeError):
        train(settings, "again", restart=False, report=write_report)
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "status-failed" in text and "the base model cannot be read" in text


def test_an_early_spike_of_the_smoothed_loss_does_not_flatten_the_chart() -> None:
    """The y range left out the raw losses' outliers but not the smoothed ones': a smoothed
    loss that starts at the first step's spike squeezed the whole curve into a line."""
    history = _history(1000, 100)
    for item in history[:3]:
        item["loss"] = item["loss_smoothed"] = 50.0
    image = loss_chart(history)
    pixels = image.load()
    later = [y for x in range(image.width // 2, image.width) for y in range(22, image.height)
             if pixels[x, y] == (20, 75, 165)]  # the smoothed curve after the spike
    bottom = image.height - 34
    assert later and bottom - max(later) > 20  # not pressed onto the x axis


def test_a_run_is_found_by_its_folder_as_the_shell_completes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`report blake_v2/` and `report Multi_Concept_Output/blake_v2` were refused with the
    advice for naming new runs."""
    from loraforge.report.command import find_run

    runs_dir = tmp_path / "Multi_Concept_Output"
    run_dir = make_run(tmp_path, samples=False)
    monkeypatch.chdir(tmp_path)
    for typed in (f"{RUN}/", f"Multi_Concept_Output/{RUN}", f"Multi_Concept_Output/{RUN}/",
                  str(run_dir)):
        assert find_run(runs_dir, typed) == runs_dir / RUN, typed
    with pytest.raises(ForgeError, match="is not a run folder of this project"):
        find_run(runs_dir, f"elsewhere/{RUN}")
    # a run folder that is a link to scratch space, typed as a path
    scratch = tmp_path / "scratch" / "linked"
    scratch.parent.mkdir()
    run_dir.rename(scratch)
    (runs_dir / "linked").symlink_to(scratch)
    assert find_run(runs_dir, "Multi_Concept_Output/linked/") == runs_dir / "linked"


def test_a_copied_run_folder_is_named_and_its_files_listed(tmp_path: Path) -> None:
    """`cp -a .../blake_v2 .../backup`: the report's title said blake_v2, and its Epochs
    section said "no epoch saved yet" beside the copied LoRA files."""
    import shutil

    original = make_run(tmp_path, samples=False)
    copy = original.parent / "backup"
    shutil.copytree(original, copy)
    text = write_report(copy).read_text(encoding="utf-8")
    assert "<title>backup:" in text and "<h1>backup " in text
    assert f"copied or renamed from {RUN}" in text
    assert "no epoch saved yet" not in text
    assert _check_links(copy / "report.html").links[-2:] == [f"{RUN}.safetensors",
                                                           f"{RUN}-000002.safetensors"]
