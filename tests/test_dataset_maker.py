"""The dataset maker: `dataset tag` with the embedded tiny tagger (real onnxruntime, real files),
the model card's input preparation, `dataset tags` (frequencies, bulk edits with dry run and
backup), `dataset dedupe` and what `dataset check` adds. One CLI run per behaviour a user sees
at the command line; the rest in-process."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, draw_character, run_cli
from PIL import Image

from loraforge.config import load_settings
from loraforge.dataset import tag_list
from loraforge.dataset.caption_edit import BACKUP_DIR, CaptionWriter
from loraforge.dataset.dedupe import (
    Picture,
    hash_distance,
    hash_pictures,
    move_extras,
    near_duplicate_groups,
    phash,
)
from loraforge.dataset.folders import concept_folders
from loraforge.dataset.tagger import prepare_image, select_tags, tag_dataset, tag_text
from loraforge.errors import ForgeError
from loraforge.models.tagger import (
    CHARACTER,
    GENERAL,
    RATING,
    Tag,
    TaggerModel,
    ensure_tiny_tagger,
    tiny_model_bytes,
)

RED, BLUE = (200, 30, 30), (30, 40, 200)


def _project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "forge.toml").write_text('[storage]\nroot = "store"\n[models]\ntagger = "tiny"\n')
    return root


def _huge_png(path: Path) -> None:
    """A PNG whose header says 30000 x 30000 pixels (900 MP): Pillow refuses it as a
    decompression bomb before reading any pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _captions(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))
            if BACKUP_DIR not in p.parts}


def _backups(dataset: Path) -> list[Path]:
    return sorted((dataset / BACKUP_DIR).glob("*")) if (dataset / BACKUP_DIR).is_dir() else []


# --- the model card's preprocessing, hand-checked -------------------------------------------

def test_input_preparation_follows_the_model_card(tmp_path: Path) -> None:
    """WD14 taggers take BGR float32 0-255, padded to a white square, resized to 448."""
    # 3 x 1 pixels: red, orange-blue, fully transparent. Alpha goes on white (load_image), the
    # square is 3 x 3 with the row in the middle ((3 - 1) // 2 = 1 white row above), and each
    # pixel is (B, G, R): red (255, 0, 0) -> [0, 0, 255]; (0, 128, 255) -> [255, 128, 0].
    path = tmp_path / "row.png"
    pixels = Image.new("RGBA", (3, 1))
    pixels.putpixel((0, 0), (255, 0, 0, 255))
    pixels.putpixel((1, 0), (0, 128, 255, 255))
    pixels.putpixel((2, 0), (10, 20, 30, 0))
    pixels.save(path)
    from loraforge.dataset.images import load_image

    white = [255.0, 255.0, 255.0]
    expected = np.array([[white, white, white],
                         [[0.0, 0.0, 255.0], [255.0, 128.0, 0.0], white],
                         [white, white, white]], dtype=np.float32)
    got = prepare_image(load_image(path), 3)
    assert got.dtype == np.float32 and got.shape == (3, 3, 3)
    np.testing.assert_array_equal(got, expected)

    # At the real size: a 896 x 448 red picture fills the middle half of a 448 x 448 white
    # square (rows 112-335); its pixels read [0, 0, 255] in BGR.
    wide = prepare_image(Image.new("RGB", (896, 448), (255, 0, 0)), 448)
    assert wide.shape == (448, 448, 3)
    np.testing.assert_array_equal(wide[0, 0], white)
    np.testing.assert_array_equal(wide[447, 447], white)
    np.testing.assert_array_equal(wide[224, 10], [0.0, 0.0, 255.0])
    np.testing.assert_array_equal(wide[120:328, :, 2], 255.0)
    assert (wide[:100] == 255.0).all() and (wide[348:] == 255.0).all()
    # The tiny tagger declares the real input: one batch of 448 x 448 x 3.
    model = TaggerModel(ensure_tiny_tagger(tmp_path / "store"))
    assert model.size == 448 and len(model.tags) == model.predict(wide[None]).shape[1]


def test_a_long_strip_is_prepared_without_its_huge_white_square() -> None:
    """60000 x 4 blue pixels: its padded square would take 10 GB; it is scaled down first
    and comes out as a faint blue line across the middle of white, as the full square would."""
    strip = prepare_image(Image.new("RGB", (60000, 4), (0, 0, 255)), 448)
    assert strip.shape == (448, 448, 3)
    assert (strip[:220] == 255.0).all() and (strip[228:] == 255.0).all()
    assert (strip[224, :, 0] == 255.0).all() and (strip[224, :, 2] < 250.0).all()  # BGR


def test_tags_are_read_as_the_model_card_says() -> None:
    tags = [Tag("general", RATING), Tag("long_hair", GENERAL), Tag("^_^", GENERAL),
            Tag("solo", GENERAL), Tag("tiny_mage_(forge)", CHARACTER), Tag(">_<", GENERAL)]
    probabilities = np.array([0.99, 0.5, 0.9, 0.2, 0.86, 0.34], dtype=np.float32)
    assert select_tags(probabilities, tags, 0.35, 0.85) == [
        "tiny mage (forge)", "^_^", "long hair"]
    assert select_tags(probabilities, tags, 0.3, 0.9) == ["^_^", "long hair", ">_<"]
    assert [tag_text(t) for t in ("o_o", "3_3", "+_+", "hat_bow", "1girl")] == [
        "o_o", "3_3", "+_+", "hat bow", "1girl"]
    assert tiny_model_bytes() == tiny_model_bytes()  # the tiny tagger is built the same way


# --- dataset tag ------------------------------------------------------------------------------

def test_tag_writes_captions_trigger_first_and_keeps_hand_captions(tmp_path: Path) -> None:
    project = _project(tmp_path / "proj")
    dataset = project / "master_dataset"
    knight, mage = dataset / "10_red_knight", dataset / "5_blue_mage"
    knight.mkdir(parents=True)
    mage.mkdir(parents=True)
    draw_character(knight / "0.png", RED, "box", -10)
    draw_character(knight / "1.png", RED, "box", 10)
    hand = "red_knight ||| my own words, red armor\n"
    (knight / "1.txt").write_text(hand)
    draw_character(knight / "2.png", BLUE, "box", 40)
    (knight / "2.txt").write_text("smiling, no trigger")
    draw_character(mage / "0.png", BLUE, "circle", 0)
    (mage / "0.txt").write_text("  \n")  # empty: tagged like a missing caption
    Image.open(mage / "0.png").convert("CMYK").save(mage / "cmyk.jpg")
    rgba = Image.open(mage / "0.png").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((256, 256)))
    rgba.save(mage / "alpha.png")
    deep = (np.asarray(Image.open(mage / "0.png").convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(mage / "deep.png")  # 16-bit grey
    assert Image.open(mage / "deep.png").mode.startswith("I")
    (mage / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    _huge_png(mage / "huge.png")
    shutil.copy(knight / "0.png", knight / "0.pose.png")  # pose extract's map: no picture

    result = run_cli("dataset", "tag", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "warning: master_dataset/5_blue_mage/broken.png:" in result.stderr
    assert "warning: master_dataset/5_blue_mage/huge.png: is too large" in result.stderr
    assert "not tagged, its caption left as it is" in result.stderr
    assert "2 hand-written kept" in result.stdout
    assert "tagged 7/7 images" in result.stdout  # the progress line (not a terminal)
    captions = _captions(dataset)
    assert captions["10_red_knight/1.txt"] == hand
    assert captions["10_red_knight/2.txt"] == "smiling, no trigger"
    assert set(captions) == {"10_red_knight/0.txt", "10_red_knight/1.txt",
                             "10_red_knight/2.txt", "5_blue_mage/0.txt",
                             "5_blue_mage/cmyk.txt", "5_blue_mage/alpha.txt",
                             "5_blue_mage/deep.txt"}
    for name, text in captions.items():
        if name in ("10_red_knight/1.txt", "10_red_knight/2.txt"):
            continue
        trigger = "red_knight" if name.startswith("10_") else "blue_mage"
        tags = text.split(", ")
        assert tags[0] == trigger and len(tags) > 1 and tags.count(trigger) == 1, (name, text)
        assert "_" not in "".join(tags[1:]).replace("^_^", "")  # words, not list names
    assert not _backups(dataset)  # nothing but an empty caption was replaced: no backup

    # Idempotent: a rerun tags nothing and changes no byte.
    settings = load_settings(project / "forge.toml")
    rerun = tag_dataset(settings, None, 0.35, 0.85, "missing", 8, print)
    assert rerun.images == 0 and _captions(dataset) == captions

    # --append: hand captions keep every character, the tagger's tags come after them, and the
    # trigger goes first where it was missing.
    appended = tag_dataset(settings, ["red_knight"], 0.35, 0.85, "append", 8, print)
    after = _captions(dataset)
    assert after["10_red_knight/1.txt"].startswith(hand.rstrip() + ", ")
    assert after["10_red_knight/2.txt"].startswith("red_knight, smiling, no trigger, ")
    assert after["10_red_knight/0.txt"] == captions["10_red_knight/0.txt"]
    assert appended.reports["10_red_knight"].written == 2
    assert appended.backup_dir is not None
    assert (appended.backup_dir / "10_red_knight" / "1.txt").read_text() == hand
    again = tag_dataset(settings, ["red_knight"], 0.35, 0.85, "append", 8, print)
    assert again.reports["10_red_knight"].written == 0 and _captions(dataset) == after

    # --overwrite: replaced, the appended caption backed up; a rerun at batch 1 changes nothing.
    over = tag_dataset(settings, ["10_red_knight"], 0.35, 0.85, "overwrite", 8, print)
    final = _captions(dataset)
    assert final["10_red_knight/1.txt"].startswith("red_knight, ")
    assert "my own words" not in final["10_red_knight/1.txt"]
    assert over.backup_dir is not None
    assert (over.backup_dir / "10_red_knight" / "1.txt").read_text() == \
        after["10_red_knight/1.txt"]
    backups = _backups(dataset)
    same = tag_dataset(settings, None, 0.35, 0.85, "overwrite", 1, print)
    assert sum(r.written for r in same.reports.values()) == 0
    assert _captions(dataset) == final and _backups(dataset) == backups


@pytest.mark.parametrize(("args", "toml", "needles"), [
    (["--overwrite", "--append"], "", ["--overwrite and --append", "choose one"]),
    (["nobody"], "", ["no concept named 'nobody'", "concepts: knight"]),
    ([], "[models]\ntagger = \"wd-tagger\"\n", ["wd-tagger: tagger model not found",
                                                 "loraforge models fetch tagger"]),
    (["--threshold", "nan"], "", ["'--threshold': must be a number from 0 to 1, got nan"]),
    (["--character-threshold", "1.5"], "", ["'--character-threshold': must be a number from 0 "
                                             "to 1, got 1.5"]),
])
def test_tag_user_errors(tmp_path: Path, args: list[str], toml: str, needles: list[str]) -> None:
    (tmp_path / "forge.toml").write_text(toml or '[models]\ntagger = "tiny"\n')
    folder = tmp_path / "master_dataset" / "3_knight"
    folder.mkdir(parents=True)
    draw_character(folder / "a.png", RED, "box", 0)
    assert_user_error(run_cli("dataset", "tag", *args, cwd=tmp_path), *needles)
    assert not list(tmp_path.rglob("*.txt"))


# --- dataset tags -----------------------------------------------------------------------------

def test_a_caption_with_an_upper_case_extension_is_the_images_caption(tmp_path: Path) -> None:
    """`check` and training read `0.TXT` as 0.png's caption; `tag` wrote a new 0.txt beside it
    (a second caption, which then won) and `tags` did not see it."""
    project = _project(tmp_path / "proj")
    knight = project / "master_dataset" / "10_red_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "0.png", RED, "box", 0)
    (knight / "0.TXT").write_text("red_knight, my own words, solo\n")
    tagged = run_cli("dataset", "tag", cwd=project)
    assert tagged.returncode == 0, tagged.stderr
    assert "1 hand-written kept" in tagged.stdout
    assert sorted(p.name for p in knight.iterdir()) == ["0.TXT", "0.png"]
    edited = run_cli("dataset", "tags", "--remove", "solo", cwd=project)
    assert edited.returncode == 0, edited.stderr
    assert (knight / "0.TXT").read_text() == "red_knight, my own words\n"
    (knight / "0.txt").write_text("red_knight, other words\n")
    assert_user_error(run_cli("dataset", "check", cwd=project),
                      "0.txt: is a second caption of 0, beside 0.TXT", "keep one")



def _terminated_once_backed_up(project: Path, args: list[str], backups: int,
                               ) -> tuple[int, str, str]:
    """`loraforge ARGS` in `project`, sent SIGTERM once it has backed up `backups` captions:
    (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "loraforge", *args], cwd=project,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    folder = project / "master_dataset" / BACKUP_DIR
    deadline = time.monotonic() + 120
    while len(list(folder.rglob("*.txt"))) < backups and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # hung: where each thread is, for whoever reads the log
        process.send_signal(signal.SIGABRT)
        out, err = process.communicate(timeout=60)
        pytest.fail(f"still running 60 s after SIGTERM; its threads:\n{err[-8000:]}")
    return process.returncode, out, err


def test_a_tagging_stopped_by_sigterm_goes_on_with_its_one_backup_folder(
        tmp_path: Path) -> None:
    """A job's time limit (SIGTERM) during `tag --overwrite`: the captions replaced so far
    have their old text in the backup folder, which the message names; the same command run
    again goes on with that folder, so that one folder holds every caption's old text (the
    rerun made a second folder of its own and named only that one: an undo as told restored
    a fraction of the captions). Another edit meanwhile is refused."""

    project = _project(tmp_path / "proj")
    folder = project / "master_dataset" / "10_knight"
    folder.mkdir(parents=True)
    draw_character(folder / "0.png", RED, "box", 0)
    for i in range(400):
        if i:
            (folder / f"{i}.png").write_bytes((folder / "0.png").read_bytes())
        (folder / f"{i}.txt").write_text(f"knight, mine {i}\n")
    before = _captions(folder)
    code, out, err = _terminated_once_backed_up(
        project, ["dataset", "tag", "--overwrite", "--batch-size", "1"], 2)
    assert code == 143, (out, err)
    backups = project / "master_dataset" / BACKUP_DIR
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    (folder_backup,) = backups.iterdir()
    assert f"the old ones are in master_dataset/{BACKUP_DIR}/{folder_backup.name}/" in err
    after = _captions(folder)
    changed = {name for name in before if after[name] != before[name]}
    assert changed and len(changed) < 400
    kept = {p.name: p.read_text() for p in (folder_backup / "10_knight").iterdir()}
    assert {name: kept[name] for name in changed} == {name: before[name] for name in changed}

    other = run_cli("dataset", "tag", "--append", cwd=project)
    assert_user_error(other, "`loraforge dataset tag --overwrite --threshold 0.35 "
                      "--character-threshold 0.85` stopped here", "run `loraforge dataset tag "
                      "--overwrite")
    assert _captions(folder) == after
    again = run_cli("dataset", "tag", "--overwrite", cwd=project)
    assert again.returncode == 0, again.stderr
    assert "continuing the tagging stopped earlier" in again.stdout + again.stderr
    assert [p.name for p in backups.iterdir()] == [folder_backup.name]
    assert f"the old captions are in master_dataset/{BACKUP_DIR}/{folder_backup.name}/" in \
        again.stdout + again.stderr
    kept = {p.name: p.read_text() for p in (folder_backup / "10_knight").iterdir()}
    assert kept == before  # every original, in the one folder: copying it back undoes it all
    assert (folder_backup / "edit.json").is_file()  # finished: nothing to go on with


def test_tagging_where_no_picture_can_be_read_is_a_failure(tmp_path: Path) -> None:
    """It exited 0 (its progress line even said "tagged 2/2 images")."""
    project = _project(tmp_path / "proj")
    folder = project / "master_dataset" / "5_broken"
    folder.mkdir(parents=True)
    (folder / "notes.png").write_text("not a picture\n")
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = run_cli("dataset", "tag", cwd=project)
    assert_user_error(result, "none of the 2 picture(s) to tag could be read",
                      "warning: master_dataset/5_broken/cut.png")
    assert not list(folder.glob("*.txt"))


def _captioned_concept(root: Path) -> Path:
    folder = root / "master_dataset" / "10_blake"
    folder.mkdir(parents=True)
    texts = ["blake, solo, 1girl, simple_background\n", "blake, 1girl, smile, Smile",
             "1girl, solo, simple background"]
    for i, text in enumerate(texts):
        draw_character(folder / f"{i}.png", RED, "box", 40 * i - 40)  # 22+ bits apart
        (folder / f"{i}.txt").write_text(text)
    draw_character(folder / "bare.png", BLUE, "circle", -40)
    return folder


def test_tag_frequencies_count_spellings_together(tmp_path: Path) -> None:
    """`simple_background` and `simple background` are one tag; `smile, Smile` counts once."""
    _captioned_concept(tmp_path)
    concepts, captions, warnings = tag_list.load(tmp_path / "master_dataset", None, ".txt")
    (blake,) = tag_list.frequencies(concepts, captions)
    assert (blake["images"], blake["captioned"], warnings) == (4, 3, [])
    assert blake["tags"] == [{"tag": "1girl", "count": 3}, {"tag": "blake", "count": 2},
                             {"tag": "solo", "count": 2},
                             {"tag": "simple_background", "count": 2},
                             {"tag": "smile", "count": 1}]


def test_tags_dry_run_shows_the_diff_and_the_edit_keeps_a_backup(tmp_path: Path) -> None:
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    result = run_cli("dataset", "tags", "--remove", "solo,simple background,blake",
                     "--replace", "1girl=1woman", "--add-trigger", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for needle in ("--- a/10_blake/0.txt", "+++ b/10_blake/0.txt",
                   "-blake, solo, 1girl, simple_background", "+blake, 1woman",
                   "-1girl, solo, simple background", "dry run: 3 caption(s) would change"):
        assert needle in result.stdout, (needle, result.stdout)
    assert _captions(folder) == before and not (tmp_path / "master_dataset" / BACKUP_DIR).exists()

    (folder / "0.txt").chmod(0o600)  # made private: an edit keeps it so
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.glob("*.txt")}
    _, captions, _ = tag_list.load(tmp_path / "master_dataset", ["blake"], ".txt")
    edits = tag_list.parse_edits(["solo,simple background,blake"], ["1girl=1woman"], True)
    done = tag_list.edit_captions(tmp_path / "master_dataset", captions, edits, False, 0o644)
    assert _captions(folder) == {"0.txt": "blake, 1woman\n", "1.txt": "blake, 1woman, smile, Smile",
                                 "2.txt": "blake, 1woman"}
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.glob("*.txt")} == modes
    assert done.backup_dir is not None
    assert {p.name: p.read_text() for p in (done.backup_dir / "10_blake").iterdir()} == before
    again = tag_list.edit_captions(tmp_path / "master_dataset",
                                   tag_list.load(tmp_path / "master_dataset", None, ".txt")[1],
                                   edits, False, 0o644)
    assert again.changed == [] and again.backup_dir is None


def test_a_caption_written_while_an_action_runs_is_left_as_it_is(tmp_path: Path) -> None:
    """A long `dataset tag` job (or an edit) read the captions when it began; a caption the
    user wrote or edited meanwhile was replaced by its output, with no backup and no word."""
    folder = _captioned_concept(tmp_path)
    dataset = tmp_path / "master_dataset"
    _, captions, _ = tag_list.load(dataset, ["blake"], ".txt")
    (folder / "0.txt").write_text("blake, my careful caption, solo")  # edited meanwhile
    edits = tag_list.parse_edits(["solo"], [], False)
    done = tag_list.edit_captions(dataset, captions, edits, False, 0o644)
    assert (folder / "0.txt").read_text() == "blake, my careful caption, solo"
    assert done.changed_meanwhile == [folder / "0.txt"]
    assert [c.path.name for c, _ in done.changed] == ["2.txt"]
    assert (folder / "2.txt").read_text() == "1girl, simple background"

    # the tagger's case: no caption when it planned, one written before its turn came
    fresh = folder / "new.txt"
    with CaptionWriter(dataset, "tag") as writer:
        fresh.write_text("blake, hand-written while tagging")
        assert not writer.write(fresh, None, "blake, 1girl, red hair")
    assert fresh.read_text() == "blake, hand-written while tagging"
    assert writer.changed_meanwhile == [fresh] and writer.written == 0


def _linked_subset(dataset: Path, real: str, links: str) -> tuple[Path, Path]:
    """Three captioned pictures of blake in `real`; `links` repeats the first as symlinks
    (`b0.png`, `b0.txt -> ../REAL/b0.txt`), the README's subset layout. (real b0.txt, link)"""
    (dataset / real).mkdir(parents=True)
    (dataset / links).mkdir()
    for i, colour in enumerate((RED, BLUE, (30, 200, 40))):
        Image.new("RGB", (16, 16), colour).save(dataset / real / f"b{i}.png")
        (dataset / real / f"b{i}.txt").write_text("blake, solo, red hat")
    for name in ("b0.png", "b0.txt"):
        (dataset / links / name).symlink_to(f"../{real}/{name}")
    return dataset / real / "b0.txt", dataset / links / "b0.txt"


SUBSET_ORDERS = [("5_blake", "10_blake"), ("10_blake", "5_blake")]  # the links first, last


@pytest.mark.parametrize(("real", "links"), SUBSET_ORDERS)
def test_an_edit_writes_a_linked_caption_through_its_link_once(tmp_path: Path, real: str,
                                                                links: str) -> None:
    """`10_blake/b0.txt -> ../5_blake/b0.txt`: the edit replaced the link with a file of its
    own (the two copies then drifted apart), silently; in the other folder order it warned the
    caption was "edited while this edit ran" and showed 4 captions in the diff for 3 changed.
    Now the target is edited once, the link kept, and the backup copied back undoes it."""
    dataset = tmp_path / "master_dataset"
    target, link = _linked_subset(dataset, real, links)
    result = run_cli("dataset", "tags", "--remove", "solo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == f"../{real}/b0.txt"
    assert target.read_text() == "blake, red hat"
    assert "edited while this edit ran" not in result.stdout + result.stderr
    assert "changed 3 caption(s)" in result.stdout and result.stdout.count("+++ b/") == 3
    (backup,) = _backups(dataset)
    assert [p.read_text() for p in backup.rglob("b0.txt")] == ["blake, solo, red hat"]

    subprocess.run(f"cp -r {backup}/*/ {dataset}/", shell=True, check=True)
    assert link.is_symlink() and target.read_text() == "blake, solo, red hat"


@pytest.mark.parametrize(("real", "links"), SUBSET_ORDERS)
def test_tagging_writes_a_linked_caption_through_its_link_once(tmp_path: Path, real: str,
                                                               links: str) -> None:
    """`dataset tag --overwrite` replaced the link with a file (links first) or warned that
    the caption was "written or edited while tagging ran" (links last)."""
    dataset = _project(tmp_path) / "master_dataset"
    target, link = _linked_subset(dataset, real, links)
    result = run_cli("dataset", "tag", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == f"../{real}/b0.txt"
    assert target.read_text().startswith("blake") and "solo, red hat" not in target.read_text()
    text = result.stdout + result.stderr
    assert "while tagging ran" not in text
    assert text.count("1 shared with another folder through a link (tagged there)") == 1
    (backup,) = _backups(dataset)
    assert [p.read_text() for p in backup.rglob("b0.txt")] == ["blake, solo, red hat"]


def _shared_by_two_concepts(dataset: Path) -> Path:
    """`5_blake`: three captioned pictures; `10_blake2`, another concept, links to the first
    two and their captions (`b0.txt -> ../5_blake/b0.txt`). Returns 5_blake."""
    blake = dataset / "5_blake"
    blake.mkdir(parents=True)
    (dataset / "10_blake2").mkdir()
    for i, colour in enumerate((RED, BLUE, (30, 200, 40))):
        Image.new("RGB", (16, 16), colour).save(blake / f"b{i}.png")
        (blake / f"b{i}.txt").write_text("solo, blake" if i == 2 else "blake, solo, red hat")
    for name in ("b0.png", "b0.txt", "b1.png", "b1.txt"):
        (dataset / "10_blake2" / name).symlink_to(f"../5_blake/{name}")
    return blake


SHARED_EDITS = [
    (["--remove", "blake"], "solo, blake",
     "'blake' is a concept's trigger, which its captions keep"),
    (["--add-trigger"], "blake, solo",
     "master_dataset/10_blake2/b0.txt: is one file (a link) with master_dataset/5_blake/b0.txt: "
     "the caption of concepts blake and blake2, which cannot start with each one's trigger; "
     "--add-trigger left its first tag as it is"),
    (["blake2", "--replace", "solo=duo"], "solo, blake",
     "master_dataset/10_blake2/b0.txt: is one file (a link) with master_dataset/5_blake/b0.txt, "
     "which this command leaves out; left as it is (fix: name blake too"),
]


@pytest.mark.parametrize(("edit", "own_caption", "note"), SHARED_EDITS)
def test_an_edit_of_a_caption_two_concepts_share_keeps_both(tmp_path: Path, edit: list[str],
                                                            own_caption: str, note: str) -> None:
    """`10_blake2/b0.txt -> ../5_blake/b0.txt`: the shared file was edited as blake2's
    caption only, so `--remove blake` took blake's trigger out of it (while saying it was
    kept), `--add-trigger` put blake2 first in blake's caption, and an edit limited to blake2
    changed blake's captions. Now such a file keeps both triggers, gets neither put first, and
    is left out of an edit that leaves out one of its concepts, each with a note."""
    dataset = tmp_path / "master_dataset"
    blake = _shared_by_two_concepts(dataset)
    result = run_cli("dataset", "tags", *edit, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert note in result.stdout + result.stderr
    assert [(blake / f"b{i}.txt").read_text() for i in range(3)] == [
        "blake, solo, red hat", "blake, solo, red hat", own_caption]
    assert (dataset / "10_blake2" / "b0.txt").is_symlink()


@pytest.mark.parametrize("concepts", [[], ["blake"]])
def test_tagging_leaves_a_caption_two_concepts_share(tmp_path: Path, concepts: list[str]) -> None:
    """`dataset tag --overwrite` wrote the shared caption with blake2's trigger for blake's
    pictures too; `dataset tag blake --overwrite` changed blake2's captions. Now that file is
    left as it is, with a warning naming both captions; blake's own picture is tagged."""
    dataset = _project(tmp_path) / "master_dataset"
    blake = _shared_by_two_concepts(dataset)
    result = run_cli("dataset", "tag", *concepts, "--overwrite", cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    (warning,) = [line for line in text.splitlines() if "b0.png not tagged" in line]
    assert "master_dataset/5_blake/b0.txt" in warning and "is one file (a link)" in warning
    assert "master_dataset/10_blake2/b0.txt" in warning
    assert ("which this command leaves out" if concepts else
            "the caption of concepts blake and blake2") in warning
    assert [(blake / f"b{i}.txt").read_text() for i in range(2)] == ["blake, solo, red hat"] * 2
    assert (blake / "b2.txt").read_text().startswith("blake")  # it was "solo, blake"


@pytest.mark.parametrize("broken", ["loop", "dangling"])
def test_tagging_skips_a_caption_link_that_reaches_no_file(tmp_path: Path, broken: str) -> None:
    """`b1.txt -> b1.txt` (a loop) stopped `dataset tag` with a traceback; `b1.txt ->
    ../../elsewhere/gone.txt` (its target missing) made the tagger create a file outside the
    dataset. Both are skipped with a warning naming the link and the fix; the rest is tagged."""
    dataset = _project(tmp_path) / "master_dataset"
    folder = dataset / "5_blake"
    folder.mkdir(parents=True)
    for i, colour in enumerate((RED, BLUE)):
        Image.new("RGB", (16, 16), colour).save(folder / f"b{i}.png")
    (tmp_path / "elsewhere").mkdir()
    target = "b1.txt" if broken == "loop" else "../../elsewhere/gone.txt"
    (folder / "b1.txt").symlink_to(target)
    result = run_cli("dataset", "tag", cwd=tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in text, text
    assert "master_dataset/5_blake/b1.txt: is a" in text and "b1.png not tagged" in text
    assert "rm master_dataset/5_blake/b1.txt" in text
    assert ("symlink loop" if broken == "loop" else f"link to {target}, which does not exist"
            ) in text
    assert (folder / "b0.txt").read_text().startswith("blake")
    assert os.readlink(folder / "b1.txt") == target
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_tags_edit_with_json_prints_json_in_a_dry_run_a_real_edit_and_a_rerun(
        tmp_path: Path) -> None:
    """`--json` printed the diff (exit 0) for an edit; the notes went to stdout too."""
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    edit = ["dataset", "tags", "--remove", "solo,blake", "--json"]
    dry = run_cli(*edit, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert (shown["dry_run"], shown["changed"], shown["backup"]) == (True, 2, None)
    assert shown["notes"] == ["note: 'blake' is a concept's trigger, which its captions keep: "
                              "not removed or replaced (rename the concept folder to change a "
                              "trigger)"]
    assert shown["notes"][0] in dry.stderr
    assert shown["captions"][0] == {
        "concept": "blake", "folder": "10_blake", "path": str(folder / "0.txt"),
        "old": "blake, solo, 1girl, simple_background\n",
        "new": "blake, 1girl, simple_background\n"}
    assert _captions(folder) == before

    done = json.loads(run_cli(*edit, cwd=tmp_path).stdout)
    assert (done["dry_run"], done["changed"]) == (False, 2)
    assert done["captions"] == shown["captions"]
    (backup,) = _backups(tmp_path / "master_dataset")
    assert done["backup"] == str(backup)
    assert json.loads(run_cli(*edit, cwd=tmp_path).stdout)["captions"] == []

    project = tmp_path / "stopped"
    mage = _mage_project(project)
    wanted = {name: text.replace(", solo", "") for name, text in _captions(mage).items()}
    assert _tags_stopped_at_caption_4(project, "--remove", "solo").returncode == 1
    again = run_cli("dataset", "tags", "--remove", "solo", "--json", cwd=project)
    assert again.returncode == 0, again.stderr
    (backup,) = _backups(project / "master_dataset")
    resumed = json.loads(again.stdout)
    assert (resumed["changed"], resumed["already_done"]) == (4, 4)
    assert resumed["resumed"] == resumed["backup"] == str(backup)
    assert "continuing the edit stopped earlier" in resumed["notes"][0]
    assert _captions(mage) == wanted


def test_tags_replace_needs_old_equals_new(tmp_path: Path) -> None:
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    assert_user_error(run_cli("dataset", "tags", "--replace", "1girl", cwd=tmp_path),
                      "--replace '1girl' is not OLD=NEW", "1girl=1woman")
    assert _captions(folder) == before


def test_a_backup_folder_that_cannot_be_made_is_named_not_the_caption(tmp_path: Path) -> None:
    """A file named .caption_backups was blamed on the caption, with chmod and disk advice."""
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    (tmp_path / "master_dataset" / BACKUP_DIR).write_text("mine\n")
    result = run_cli("dataset", "tags", "--remove", "solo", cwd=tmp_path)
    assert_user_error(result, BACKUP_DIR, "cannot keep a backup of 0.txt there",
                      "move away a file of that name")
    assert _captions(folder) == before


def _mage_project(root: Path, details: int = 200) -> Path:
    """8 captioned pictures of "blue_mage"; the caption of 4 has `details` tags more."""
    folder = _project(root) / "master_dataset" / "10_blue_mage"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (16, 16), RED).save(folder / f"{i}.png")
        extra = "".join(f", detail {n}" for n in range(details)) if i == 4 else ""
        (folder / f"{i}.txt").write_text(f"blue_mage, 1girl, solo, pose {i}{extra}\n")
    return folder


def _tags_stopped_at_caption_4(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`dataset tags ARGS`, stopped by the file system part-way: a 1 KB limit on the size of a
    file (RLIMIT_FSIZE: "File too large", as a full disk says "No space left") lets it back up
    and edit captions 0 to 3, and refuses to write a longer file for 4 (its backup, or the
    edited caption)."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("LORAFORGE_STORAGE_ROOT", None)
    return subprocess.run([sys.executable, "-m", "loraforge", "dataset", "tags", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)


LONG = "pose four seen from far above in the blue light of a winter morning"


@pytest.mark.parametrize(("edit", "details", "failure"), [
    # a swap: done twice, it swaps back
    (["--replace", "1girl=solo,solo=1girl"], 200, "cannot keep a backup of 4.txt there"),
    # a chain: done twice, "solo" becomes "alone"
    (["--replace", "1girl=solo,solo=alone"], 200, "cannot keep a backup of 4.txt there"),
    (["--remove", "solo", "--replace", "1girl=solo", "--add-trigger"], 200,
     "cannot keep a backup of 4.txt there"),
    # 4.txt is backed up, then its edit (longer than 1 KB) cannot be written
    (["--replace", f"1girl=solo,solo=1girl,pose 4={LONG}"], 88, "4.txt: cannot be written"),
])
def test_an_edit_stopped_part_way_goes_on_where_it_stopped_when_run_again(
        tmp_path: Path, edit: list[str], details: int, failure: str) -> None:
    """The fix of a stopped edit said "run the same command again", which edited again the
    captions already edited (a swap swapped them back, a chain lost a tag) and backed up those
    edited captions, not the originals, in a second folder. Now the rerun skips them and reuses
    the first folder: the captions of one uninterrupted run, and every original in one backup."""
    reference = _mage_project(tmp_path / "reference", details)
    assert run_cli("dataset", "tags", *edit, cwd=tmp_path / "reference").returncode == 0
    wanted = _captions(reference)

    project = tmp_path / "proj"
    folder = _mage_project(project, details)
    before = _captions(folder)
    assert len(before["4.txt"]) < 1024 < len(wanted["4.txt"]) or len(before["4.txt"]) > 1024
    stopped = _tags_stopped_at_caption_4(project, *edit)
    assert_user_error(stopped, failure, "(File too large)", "run the same command again")
    (backup,) = _backups(project / "master_dataset")
    assert f"stopped after 4 caption(s) written; the old ones are in master_dataset/{BACKUP_DIR}/"\
        f"{backup.name}/: run the same command again to finish the edit" in stopped.stderr
    half = _captions(folder)
    assert [name for name in half if half[name] != before[name]] == [f"{i}.txt" for i in range(4)]

    again = run_cli("dataset", "tags", *edit, cwd=project)
    assert again.returncode == 0, again.stderr
    assert f"continuing the edit stopped earlier (master_dataset/{BACKUP_DIR}/{backup.name}/): 4 "\
        "caption(s) already done" in again.stdout
    assert "changed 4 caption(s) (and 4 before it stopped)" in again.stdout
    assert _captions(folder) == wanted
    assert _backups(project / "master_dataset") == [backup]
    assert {f.name: f.read_text() for f in (backup / "10_blue_mage").iterdir()} == before
    assert sorted(p.name for p in backup.glob("*.json")) == ["edit.json"]  # finished


def test_a_swap_stopped_by_sigterm_finishes_as_one_run_when_run_again(tmp_path: Path) -> None:
    """SIGTERM (a job's time limit) part-way through a swap: the rerun it advises swapped the
    captions already swapped back. Now it swaps only the others, and the one backup folder
    holds every original, though the concept folder's repeat count changed in between (the
    backups were looked for under the new name: every caption swapped again)."""

    project = _project(tmp_path / "proj")
    folder = project / "master_dataset" / "10_blue_mage"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16), RED).save(folder / "0000.png")
    for i in range(400):  # enough that the signal lands part-way
        if i:
            shutil.copyfile(folder / "0000.png", folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(f"blue_mage, 1girl, solo, pose {i}\n")
    before = _captions(folder)
    swap = ["dataset", "tags", "--replace", "1girl=solo,solo=1girl"]
    code, out, err = _terminated_once_backed_up(project, swap, 20)
    assert code == 143, (out, err)
    assert "run the same command again to finish the edit" in err
    (backup,) = _backups(project / "master_dataset")
    assert 0 < sum(_captions(folder)[n] != before[n] for n in before) < 400
    # its repeat count changed meanwhile (as `dataset check` may advise): the same concept
    folder = folder.rename(folder.with_name("20_blue_mage"))

    again = run_cli(*swap, cwd=project)
    assert again.returncode == 0, again.stderr
    assert "continuing the edit stopped earlier" in again.stdout
    assert _captions(folder) == {n: t.replace("1girl, solo", "solo, 1girl")
                                 for n, t in before.items()}
    assert _backups(project / "master_dataset") == [backup]
    assert [p.name for p in backup.iterdir() if p.is_dir()] == ["10_blue_mage"]
    assert {f.name: f.read_text() for f in (backup / "10_blue_mage").iterdir()} == before


def test_another_edit_is_refused_while_one_is_unfinished_until_it_is_finished_or_undone(
        tmp_path: Path) -> None:
    """A different edit on top of a half-done one gave captions neither edit gives, and hid
    the stopped edit's state. It is refused, naming the folder and both ways out; undoing it
    as the message says gives back the captions from before it."""
    swap = ["--replace", "1girl=solo,solo=1girl"]
    project = tmp_path / "proj"
    folder = _mage_project(project)
    before = _captions(folder)
    assert _tags_stopped_at_caption_4(project, *swap).returncode == 1
    (backup,) = _backups(project / "master_dataset")
    half = _captions(folder)

    dry = run_cli("dataset", "tags", "--replace", "1girl=woman", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert f"note: an edit stopped earlier (master_dataset/{BACKUP_DIR}/{backup.name}/)" in \
        dry.stdout
    refused = run_cli("dataset", "tags", "--replace", "1girl=woman", cwd=project)
    assert_user_error(refused, f"master_dataset/{BACKUP_DIR}/{backup.name}: `loraforge dataset "
                      "tags --replace 1girl=solo,solo=1girl` stopped here before it finished "
                      "(4 caption(s) edited", "finish the stopped edit first", "or undo it")
    assert _captions(folder) == half and _backups(project / "master_dataset") == [backup]
    tagger = run_cli("dataset", "tag", "--overwrite", cwd=project)  # it changes captions too
    assert_user_error(tagger, f"{backup.name}: `loraforge dataset tags --replace "
                      "1girl=solo,solo=1girl` stopped here", "`loraforge dataset tag --overwrite "
                      "--threshold 0.35 --character-threshold 0.85` was not started")
    assert _captions(folder) == half and _backups(project / "master_dataset") == [backup]

    # the way back: the commands the fix gives, as a user would paste them
    fix = " ".join(refused.stderr.split("fix:", 1)[1].split())  # the console may wrap it
    for verb in ("cp -r", "rm -r"):
        args = fix.split(f"({verb} ", 1)[1].split(")", 1)[0]
        subprocess.run(f"{verb} {args}", shell=True, cwd=project, check=True)
    assert _captions(folder) == before and _backups(project / "master_dataset") == []
    woman = run_cli("dataset", "tags", "--replace", "1girl=woman", cwd=project)
    assert woman.returncode == 0, woman.stderr
    assert _captions(folder) == {name: text.replace("1girl", "woman")
                                 for name, text in before.items()}


def test_the_undo_of_a_stopped_edit_follows_a_renamed_concept_folder(tmp_path: Path) -> None:
    """The concept folder's repeat count changed after an edit stopped (10_blue_mage ->
    20_blue_mage): the refusal counted 0 captions edited, and its undo command (`cp -r
    BACKUP/*/ master_dataset/`) brought the old folder back beside the renamed one, a second
    copy of the concept that training would read twice. Both follow the rename now."""
    project = tmp_path / "proj"
    folder = _mage_project(project)
    before = _captions(folder)
    assert _tags_stopped_at_caption_4(project, "--replace", "1girl=solo,solo=1girl"
                                      ).returncode == 1
    folder = folder.rename(folder.with_name("20_blue_mage"))
    dataset = project / "master_dataset"

    with pytest.raises(ForgeError) as refused:
        tag_list.stopped_edit(dataset, tag_list.Edits(replace={"1girl": "woman"}).record(None))
    assert "(4 caption(s) edited" in refused.value.message
    fix = str(refused.value.fix)
    for verb in ("cp -r", "rm -r"):
        args = fix.split(f"({verb} ", 1)[1].split(")", 1)[0]
        subprocess.run(f"{verb} {args}", shell=True, check=True)
    assert [p.name for p in dataset.iterdir() if not p.name.startswith(".")] == ["20_blue_mage"]
    assert _backups(dataset) == []
    assert _captions(folder) == before


def test_finishing_the_stopped_edit_lets_another_one_run(tmp_path: Path) -> None:
    """The other way out of the refusal: the stopped edit (whose dry run shows only what is
    left of it), run again, finishes; then the new edit runs on the finished captions."""
    swap = ["--replace", "1girl=solo,solo=1girl"]
    project = tmp_path / "proj"
    folder = _mage_project(project)
    before = _captions(folder)
    assert _tags_stopped_at_caption_4(project, *swap).returncode == 1
    assert run_cli("dataset", "tags", "--replace", "1girl=woman", cwd=project).returncode == 1
    dry = run_cli("dataset", "tags", *swap, "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    for needle in ("this edit stopped earlier", "4 caption(s) already done",
                   "+++ b/10_blue_mage/4.txt", "dry run: 4 caption(s) would change"):
        assert needle in dry.stdout, (needle, dry.stdout)
    assert "b/10_blue_mage/3.txt" not in dry.stdout
    assert run_cli("dataset", "tags", *swap, cwd=project).returncode == 0
    swapped = {name: text.replace("1girl, solo", "solo, 1girl") for name, text in before.items()}
    assert _captions(folder) == swapped
    woman = run_cli("dataset", "tags", "--replace", "1girl=woman", cwd=project)
    assert woman.returncode == 0, woman.stderr
    assert _captions(folder) == {name: text.replace("1girl", "woman")
                                 for name, text in swapped.items()}
    assert len(_backups(project / "master_dataset")) == 2


@pytest.mark.parametrize(("args", "needle"), [
    (["--remove", "solo", "--replace", "solo=duo"], "solo: both removed (--remove) and replaced"),
    (["--replace", "solo=x", "--replace", "solo=y"], "two new names ('x' and 'y')"),
])
def test_contradictory_tag_edits_are_refused(tmp_path: Path, args: list[str],
                                             needle: str) -> None:
    """One of the two silently won."""
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    assert_user_error(run_cli("dataset", "tags", *args, cwd=tmp_path), needle)
    assert _captions(folder) == before


def test_editing_a_trigger_away_says_why_nothing_changed(tmp_path: Path) -> None:
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    result = run_cli("dataset", "tags", "--remove", "blake", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "'blake' is a concept's trigger, which its captions keep" in result.stdout + \
        result.stderr
    assert _captions(folder) == before


@pytest.mark.parametrize(("option", "value"), [("--remove", ","), ("--remove", " "),
                                               ("--replace", ", ,")])
def test_an_edit_naming_no_tag_is_refused_not_a_silent_listing(tmp_path: Path, option: str,
                                                               value: str) -> None:
    """It printed the tag table with exit 0, as if the captions had been edited."""
    folder = _captioned_concept(tmp_path)
    before = _captions(folder)
    assert_user_error(run_cli("dataset", "tags", option, value, cwd=tmp_path),
                      f"{option} {value!r} names no tag")
    assert _captions(folder) == before


# --- dataset dedupe and check --------------------------------------------------------------

def test_dedupe_groups_near_duplicates_and_moves_the_extras(tmp_path: Path) -> None:
    """Groups are per concept folder: the same picture in another concept teaches that
    concept's trigger, so the mage keeps its copy (its only picture but one)."""
    dataset = tmp_path / "master_dataset"
    knight, mage = dataset / "10_knight", dataset / "10_mage"
    knight.mkdir(parents=True)
    mage.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    Image.open(knight / "a.png").resize((200, 200)).save(knight / "a_small.jpg", quality=80)
    (knight / "a_small.txt").write_text("knight, small copy")
    draw_character(knight / "b.png", BLUE, "circle", 30)
    draw_character(mage / "c.png", (30, 160, 40), "circle", -30)
    Image.open(knight / "a.png").save(mage / "a_copy.png")

    # A flat picture: only the DC coefficient lies above the median (of zeros).
    assert phash(Image.new("RGB", (90, 60), (9, 200, 20))) == 1 << 63
    warnings: list[str] = []
    pictures = hash_pictures(concept_folders(dataset), ".txt", warnings)
    groups = near_duplicate_groups(pictures, 6)
    assert warnings == [] and len(pictures) == 5
    assert [[p.path.relative_to(dataset).as_posix() for p in g] for g in groups] == [
        ["10_knight/a.png", "10_knight/a_small.jpg"]]

    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "group 1: keep master_dataset/10_knight/a.png (256x256)" in result.stdout
    assert "1 near-duplicate(s) in 1 group(s)" in result.stdout
    moved = dataset / ".duplicates"
    assert sorted(p.relative_to(moved).as_posix() for p in moved.rglob("*") if p.is_file()) \
        == ["10_knight/a_small.jpg", "10_knight/a_small.txt", "copied_captions.txt"]
    assert (moved / "10_knight" / "a_small.txt").read_text() == "knight, small copy"
    # the kept a.png had no caption: it got a copy of its near-duplicate's
    assert sorted(p.name for p in knight.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert (knight / "a.txt").read_text() == "knight, small copy"
    assert sorted(p.name for p in mage.iterdir()) == ["a_copy.png", "c.png"]

    # a copy moved again under a name .duplicates/ already holds is renamed, not written over
    Image.open(knight / "a.png").resize((200, 200)).save(knight / "a_small.jpg", quality=80)
    (knight / "a_small.txt").write_text("knight, second copy")
    assert run_cli("dataset", "dedupe", "--move", cwd=tmp_path).returncode == 0
    assert (moved / "10_knight" / "a_small.txt").read_text() == "knight, small copy"
    assert (moved / "10_knight" / "a_small~2.txt").read_text() == "knight, second copy"
    assert (moved / "10_knight" / "a_small~2.jpg").is_file()


def test_dedupe_moves_only_pictures_near_the_kept_one_not_a_whole_camera_pan(
        tmp_path: Path) -> None:
    """Twenty frames of a camera pan, each a few bits from the next: the pairs were chained
    into one group, and `--move` left only the first frame, although the last ones are 30 bits
    and more from it (as far as unrelated pictures) and the output listed them "34 bits
    apart" under "distance <= 6". Now every picture moved is within the distance of the one
    kept, and the frames far from it stay for training."""
    folder = tmp_path / "master_dataset" / "20_dave"
    folder.mkdir(parents=True)
    pixels = (np.random.default_rng(5).random((60, 200, 3)) * 255).astype(np.uint8)
    scene = Image.fromarray(pixels).resize((2000, 600), Image.Resampling.BICUBIC)
    for i in range(20):
        scene.crop((4 * i, 0, 4 * i + 600, 600)).resize((256, 256)).save(
            folder / f"frame{i:02d}.png")
    pictures = hash_pictures(concept_folders(tmp_path / "master_dataset"), ".txt", [])
    assert hash_distance(pictures[0].hash, pictures[-1].hash) > 24  # first and last: unrelated

    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    apart = [int(n) for n in re.findall(r"(\d+) bits apart", result.stdout)]
    assert apart and max(apart) <= 6, result.stdout
    left = sorted(p.name for p in folder.iterdir())
    assert "frame00.png" in left and "frame19.png" in left and len(left) >= 4, left
    assert len(apart) == 20 - len(left)


def test_dedupe_tells_flat_and_recoloured_pictures_apart_by_colour(tmp_path: Path) -> None:
    """A flat dark red picture, a 1x1 black one and a transparent one (on white, as trained)
    were one group "0-1 bits apart", as were a red and a blue knight: the perceptual hash sees
    grey structure only. Now pictures of clearly other colours are no near-duplicates, while a
    re-saved JPEG and a slightly smaller copy still are."""
    folder = tmp_path / "master_dataset" / "10_knight"
    folder.mkdir(parents=True)
    Image.new("RGB", (600, 400), (120, 30, 40)).save(folder / "red.png")
    Image.open(folder / "red.png").save(folder / "red_resaved.jpg", quality=85)
    Image.new("RGB", (1, 1), (0, 0, 0)).save(folder / "black.png")
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(folder / "transparent.png")
    draw_character(folder / "knight_red.png", RED, "box", 0)
    draw_character(folder / "knight_blue.png", BLUE, "box", 0)
    Image.open(folder / "knight_red.png").resize((240, 240)).save(folder / "knight_red_small.png")

    result = run_cli("dataset", "dedupe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "7 pictures compared: 2 near-duplicate(s) in 2 group(s)" in result.stdout
    assert re.findall(r"10_knight/(\S+) \(", result.stdout) == [
        "knight_red.png", "knight_red_small.png", "red.png", "red_resaved.jpg"], result.stdout


def test_dedupe_move_run_again_after_a_stop_takes_the_captions_it_left_behind(
        tmp_path: Path) -> None:
    """A move stopped between a picture and its caption (SIGKILL, SIGTERM) left the caption in
    the concept folder; the rerun found no duplicate, and the caption stayed, alone."""
    dataset = tmp_path / "master_dataset"
    knight = dataset / "10_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    (knight / "a.txt").write_text("knight")  # kept: captioned and first by name
    for name in ("a_copy", "a_other"):
        Image.open(knight / "a.png").save(knight / f"{name}.png")
        (knight / f"{name}.txt").write_text(f"knight, {name}")
    moved = dataset / ".duplicates" / "10_knight"
    moved.mkdir(parents=True)
    (moved / "a_other.png").write_bytes(b"an earlier move's picture, captioned")
    (moved / "a_other.txt").write_text("an earlier caption")
    assert run_cli("dataset", "dedupe", "--move", cwd=tmp_path).returncode == 0
    assert (moved / "a_other~2.png").is_file() and (moved / "a_copy.png").is_file()
    for name in ("a_copy.txt", "a_other~2.txt"):  # as a stop before the captions leaves them
        (moved / name).rename(knight / name.replace("~2", ""))

    again = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "moved master_dataset/10_knight/a_copy.txt -> master_dataset/.duplicates/10_knight/" \
           "a_copy.txt (its picture was moved by a move that stopped" in again.stdout
    assert sorted(p.name for p in knight.iterdir()) == ["a.png", "a.txt"]
    assert (moved / "a_other~2.txt").read_text() == "knight, a_other"
    assert (moved / "a_other.txt").read_text() == "an earlier caption"


def test_dedupe_move_takes_a_left_caption_with_an_upper_case_extension_or_a_tilde(
        tmp_path: Path) -> None:
    """`sc.TXT` is sc.png's caption, and `pic~edit.txt` pic~edit.png's: the rerun missed both
    (and `pic.txt`, a stray caption, is not pic~edit.png's: only `~2`, `~3`... are added). A
    second caption of sc.png (`sc.txt`, which `dataset check` refuses) stays, not written over
    the first."""
    dataset = tmp_path / "master_dataset"
    knight, moved = dataset / "10_knight", dataset / ".duplicates" / "10_knight"
    knight.mkdir(parents=True)
    moved.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    for name in ("sc.png", "pic~edit.png"):  # moved by a move that stopped before the captions
        draw_character(moved / name, BLUE, "circle", 30)
    for name in ("sc.TXT", "sc.txt", "pic~edit.txt", "pic.txt"):
        (knight / name).write_text(f"knight, {name}")

    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in knight.iterdir()) == ["a.png", "pic.txt", "sc.txt"]
    assert (moved / "sc.txt").read_text() == "knight, sc.TXT"
    assert (moved / "pic~edit.txt").read_text() == "knight, pic~edit.txt"
    assert "moved master_dataset/10_knight/pic~edit.txt -> master_dataset/.duplicates/" \
           "10_knight/pic~edit.txt (its picture was moved" in result.stdout


def test_dedupe_keeps_the_file_a_link_points_to_not_the_link(tmp_path: Path) -> None:
    """A captioned link to a picture in the same folder: moving the picture away left the
    kept link broken, and `dataset check` then failed on it."""
    folder = tmp_path / "master_dataset" / "10_knight"
    folder.mkdir(parents=True)
    draw_character(folder / "real.png", RED, "box", -20)
    (folder / "link.png").symlink_to("real.png")
    (folder / "link.txt").write_text("knight, via a link")
    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (folder / "real.png").is_file() and not (folder / "link.png").is_symlink()
    moved = tmp_path / "master_dataset" / ".duplicates" / "10_knight"
    assert sorted(p.name for p in moved.iterdir()) == ["link.png", "link.txt"]
    assert run_cli("dataset", "check", cwd=tmp_path).returncode == 0


def test_dedupe_move_that_fails_names_the_file_and_keeps_what_moved(tmp_path: Path) -> None:
    """A `.duplicates/<concept>` (or `.duplicates`) that is a file, not a folder: one error
    naming the picture, the file in the way and the fix, exit 1, no traceback; the picture
    stays where it was."""
    dataset = tmp_path / "master_dataset"
    knight = dataset / "10_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    Image.open(knight / "a.png").save(knight / "a_copy.png")
    (dataset / ".duplicates").mkdir()
    (dataset / ".duplicates" / "10_knight").write_text("in the way")
    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert_user_error(result, "master_dataset/10_knight/a_copy.png: cannot be moved to",
                      ".duplicates/10_knight is a file, not a folder",
                      "rename or move that file away", "dataset dedupe --move")
    assert sorted(p.name for p in knight.iterdir()) == ["a.png", "a_copy.png"]
    shutil.rmtree(dataset / ".duplicates")
    (dataset / ".duplicates").write_text("in the way too")  # the folder of all concepts
    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert_user_error(result, "master_dataset/.duplicates is a file, not a folder")
    assert sorted(p.name for p in knight.iterdir()) == ["a.png", "a_copy.png"]
    assert (dataset / ".duplicates").read_text() == "in the way too"


def test_dedupe_move_gives_the_kept_upscale_its_original_caption_and_the_undo_is_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        ) -> None:
    """The kept picture is the largest: here a 512 px upscale without a caption, so the 256 px
    original's hand-written caption went with it into .duplicates/ and the concept silently
    trained the upscale on its name alone. Now the dry run says the upscale will get a copy,
    `--move` gives it one (the original still goes with its picture) and lists it, and the
    undo the list describes leaves the folder byte for byte as it was."""
    from loraforge.dataset.command import dedupe_command

    dataset = tmp_path / "master_dataset"
    knight = dataset / "10_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    (knight / "a.txt").write_text("knight, hand written")
    Image.open(knight / "a.png").resize((512, 512)).save(knight / "a_up.png")
    before = {p.name: p.read_bytes() for p in knight.iterdir()}
    monkeypatch.chdir(tmp_path)
    dedupe_command(distance=6, move=False)
    assert "a_up.png has no caption: --move gives it a copy of a.txt" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in knight.iterdir()} == before

    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "copied master_dataset/10_knight/a.txt -> master_dataset/10_knight/a_up.txt" \
        in result.stdout
    assert (knight / "a_up.txt").read_text() == "knight, hand written"
    moved = dataset / ".duplicates" / "10_knight"
    assert sorted(p.name for p in moved.iterdir()) == ["a.png", "a.txt"]
    listed = (dataset / ".duplicates" / "copied_captions.txt").read_text()
    assert "10_knight/a_up.txt: copied from 10_knight/a.txt; to undo, delete it" in listed
    for path in moved.iterdir():  # the undo: the files back, the listed copy deleted
        path.rename(knight / path.name)
    (knight / "a_up.txt").unlink()
    assert {p.name: p.read_bytes() for p in knight.iterdir()} == before

    (knight / "a_up.txt").write_text("\n")  # a caption of a line break holds no tag either
    result = run_cli("dataset", "dedupe", "--move", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (knight / "a_up.txt").read_text() == "knight, hand written"


def _knight_with_a_copy(tmp_path: Path) -> tuple[Path, Path, list[list[Picture]]]:
    """A concept folder with a captioned picture (kept: first by name) and its captioned copy:
    (dataset, folder, groups)."""
    dataset = tmp_path / "master_dataset"
    knight = dataset / "10_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    (knight / "a.txt").write_text("knight")
    Image.open(knight / "a.png").save(knight / "a_copy.png")
    (knight / "a_copy.txt").write_text("knight, a copy")
    groups = near_duplicate_groups(hash_pictures(concept_folders(dataset), ".txt", []))
    return dataset, knight, groups


def _refuse_in(folder: Path, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the os calls `names` (rename, unlink, open) fail in `folder` as in an immutable
    folder (`chattr +i`, which refuses even root), whatever the user running the tests."""
    for name in names:
        real = getattr(os, name)

        def refused(path: str | Path, *args: object, real: Callable[..., object] = real,
                    **kwargs: object) -> object:
            if Path(path).parent == folder:
                raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refused)


def test_dedupe_move_where_renaming_is_refused_leaves_no_copy_and_names_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that refuses renames (immutable, read-only, a shared sticky one): the move fell
    back to copy-then-delete, the delete failed too, and each run left one more full copy in
    .duplicates/ while the picture stayed, under "what was moved stays moved". Now nothing is
    copied, and the message names the folder and the fix."""
    dataset, knight, groups = _knight_with_a_copy(tmp_path)
    _refuse_in(knight, monkeypatch, "rename", "unlink", "open")
    for _ in range(2):
        with pytest.raises(ForgeError) as info:
            list(move_extras(dataset, groups, ".txt"))
        assert f"{knight} refuses changes" in info.value.message
        assert f"chattr -i {knight}" in str(info.value.fix)
        assert sorted(p.name for p in knight.iterdir()) == [
            "a.png", "a.txt", "a_copy.png", "a_copy.txt"]
        assert not any(p.is_file() for p in (dataset / ".duplicates").rglob("*"))


def test_dedupe_move_onto_another_file_system_copies_and_never_keeps_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Across file systems (EXDEV) a copy, then a delete; a refused delete removes the copy
    again (it stayed: two of each picture); a delete that works completes the move."""
    dataset, knight, groups = _knight_with_a_copy(tmp_path)

    def other_file_system(source: object, dest: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source))

    monkeypatch.setattr(os, "rename", other_file_system)
    with monkeypatch.context() as refusing:
        _refuse_in(knight, refusing, "unlink")
        with pytest.raises(ForgeError, match="cannot be moved to"):
            list(move_extras(dataset, groups, ".txt"))
    # (the hidden, empty file that found the folder refusing deletes stays: no scan reads it)
    assert sorted(p.name for p in knight.iterdir() if not p.name.startswith(".")) == [
        "a.png", "a.txt", "a_copy.png", "a_copy.txt"]
    assert not any(p.is_file() for p in (dataset / ".duplicates").rglob("*"))
    assert [s.done for s in move_extras(dataset, groups, ".txt")] == ["moved", "moved"]
    assert sorted(p.name for p in (dataset / ".duplicates" / "10_knight").iterdir()) == [
        "a_copy.png", "a_copy.txt"]
    assert sorted(p.name for p in knight.iterdir() if not p.name.startswith(".")) == [
        "a.png", "a.txt"]


def test_dedupe_move_skips_what_another_move_at_the_same_time_moved(tmp_path: Path) -> None:
    """Two `dedupe --move` at once: the second found the picture gone and failed with "No such
    file" and advice to make the folder writable. Now it skips it, saying why."""
    dataset, knight, groups = _knight_with_a_copy(tmp_path)
    moved = dataset / ".duplicates" / "10_knight"
    moved.mkdir(parents=True)
    for name in ("a_copy.png", "a_copy.txt"):  # the other process, a moment earlier
        (knight / name).rename(moved / name)
    steps = list(move_extras(dataset, groups, ".txt"))
    assert [s.done for s in steps] == ["gone"]
    from loraforge.dataset.command import _dedupe_step  # the line the command prints

    assert "skipped master_dataset/10_knight/a_copy.png: no longer there (another `dataset " \
           "dedupe --move`" in _dedupe_step(steps[0]).replace(f"{tmp_path}/", "")
    assert sorted(p.name for p in moved.iterdir()) == ["a_copy.png", "a_copy.txt"]


def test_dedupe_leaves_pose_maps_out(tmp_path: Path) -> None:
    """A pose map beside its picture (`pose extract`'s NAME.pose.png, or a marked PNG of
    another name) was hashed as a picture of the concept; training skips it, and so do dedupe,
    tag and tags (`dataset check` names them, with the command that moves them out)."""
    from PIL.PngImagePlugin import PngInfo

    from loraforge.generate.poses import POSE_MARK

    dataset = tmp_path / "master_dataset"
    knight = dataset / "10_knight"
    knight.mkdir(parents=True)
    draw_character(knight / "a.png", RED, "box", -20)
    marked = PngInfo()
    marked.add_text(*POSE_MARK)
    for name in ("a.pose.png", "skeleton.png"):
        Image.open(knight / "a.png").save(knight / name, pnginfo=marked)
    warnings: list[str] = []
    pictures = hash_pictures(concept_folders(dataset), ".txt", warnings)
    assert [p.path.name for p in pictures] == ["a.png"]
    assert warnings == []


def test_pictures_that_would_share_a_caption_are_left_out_and_nothing_is_lost(
        tmp_path: Path) -> None:
    """`x.png` and `x.jpg` share `x.txt`: tag, tags and dedupe leave both out with a warning
    naming them, so the hand-written caption (and its backup) stays as it was."""
    _project(tmp_path)
    folder = tmp_path / "master_dataset" / "10_mira"
    folder.mkdir(parents=True)
    draw_character(folder / "x.png", RED, "box", -20)
    Image.open(folder / "x.png").save(folder / "x.jpg", quality=95)
    draw_character(folder / "y.png", BLUE, "circle", 30)
    (folder / "x.txt").write_text("mira, hand written caption, solo")
    for args in (["tag", "--overwrite"], ["tags", "--remove", "solo"], ["dedupe", "--move"]):
        result = run_cli("dataset", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "x.jpg and x.png would share one caption file; left out" in \
            result.stdout + result.stderr, args
        assert (folder / "x.txt").read_text() == "mira, hand written caption, solo"
    assert sorted(p.name for p in folder.iterdir()) == ["x.jpg", "x.png", "x.txt", "y.png",
                                                        "y.txt"]


@pytest.mark.parametrize(("caption", "replace", "expected"), [
    ("blake, 1girl, solo", {"1girl": "solo", "solo": "1girl"}, "blake, solo, 1girl"),
    ("blake, a, b", {"a": "b", "b": "c"}, "blake, b, c"),
    ("blake, a, b", {"a": "b"}, "blake, b"),
    ("blake, a, a, b", {"b": "c"}, "blake, a, a, c"),
])
def test_replacements_apply_at_once(caption: str, replace: dict[str, str],
                                    expected: str) -> None:
    """Swaps and chains keep every tag; a renamed tag that repeats one left as it was goes;
    repeats the user wrote stay."""
    from loraforge.dataset.caption_edit import replace_tags

    assert replace_tags(caption, replace, keep=["blake"]) == expected


def test_removing_a_tag_keeps_the_spacing_of_the_rest() -> None:
    from loraforge.dataset.caption_edit import remove_tags

    assert remove_tags("blake, 1girl\r\nsolo", ["1girl"]) == "blake\r\nsolo"
    assert remove_tags("blake, 1girl, solo\n", ["1girl"]) == "blake, solo\n"
    assert remove_tags("a ||| b, c", ["b"]) == "a ||| c"
    assert remove_tags("blake\rsmile\rsolo", ["smile"]) == "blake\rsolo"  # old Mac breaks


def test_removing_the_last_tag_of_a_line_keeps_the_line_break(tmp_path: Path) -> None:
    """`alice, 1girl, red dress` over a description line lost its line break with `red dress`
    (one line: kohya, which reads the first line, then trained on the description too); a
    CRLF caption the same. The comma before the tag goes, the other lines stay as they were."""
    folder = tmp_path / "master_dataset" / "10_alice"
    folder.mkdir(parents=True)
    captions = {"a": b"alice, 1girl, red dress\na woman standing in a field\n",
                "b": b"alice, red dress\r\nsmile, solo\r\n"}
    for name, text in captions.items():
        Image.new("RGB", (16, 16), RED).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(text)
    result = run_cli("dataset", "tags", "--remove", "red dress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (folder / "a.txt").read_bytes() == b"alice, 1girl\na woman standing in a field\n"
    assert (folder / "b.txt").read_bytes() == b"alice\r\nsmile, solo\r\n"
    assert "+alice, 1girl" in result.stdout and "-a woman standing" not in result.stdout


def test_an_edit_that_changes_no_tag_leaves_the_caption_as_it_was() -> None:
    """Stray commas were stripped, and the file counted as changed, with no tag removed."""
    from loraforge.dataset.caption_edit import caption_tags, remove_tags

    odd = "(solo:1.2), red_knight,,  , smile,"
    assert remove_tags(odd, ["1girl"]) == odd
    assert caption_tags("red_knight\rsolo\rsmile") == ["red_knight", "solo", "smile"]


def test_escaped_and_weighted_tags_are_the_tags_they_spell() -> None:
    """A1111's WD14 tagger escapes brackets (`\\(forge\\)`) and prompts weight tags
    (`(armor:1.2)`): an edit, an append and the tag counts treat them as the plain tag."""
    from loraforge.dataset.caption_edit import append_tags, remove_tags, replace_tags, tag_key

    caption = "blake, tiny knight \\(forge\\), (armor:1.2), blue_eyes"
    assert tag_key("tiny knight \\(forge\\)") == tag_key("tiny_knight_(forge)")
    assert tag_key("(armor: 1.2)") == tag_key("Armor") != tag_key("(armor)")
    assert remove_tags(caption, ["tiny knight (forge)", "armor"]) == "blake, blue_eyes"
    assert replace_tags(caption, {"armor": "plate armor"}) == \
        "blake, tiny knight \\(forge\\), plate armor, blue_eyes"
    assert append_tags(caption, ["tiny knight (forge)", "armor", "smile"]) == caption + ", smile"


@pytest.mark.parametrize(("caption", "expected"), [
    ("blake, smile,", "blake, smile, armor"),
    ("blake, smile,\n", "blake, smile, armor\n"),
    ("blake |||", "blake ||| armor"),
    ("", "armor"),
])
def test_appended_tags_follow_a_trailing_separator_without_doubling_it(caption: str,
                                                                       expected: str) -> None:
    from loraforge.dataset.caption_edit import append_tags

    assert append_tags(caption, ["armor"]) == expected


def test_a_stop_just_after_a_caption_is_replaced_keeps_its_backup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (or SIGTERM) landing after the new caption's rename but before it is counted:
    the backup of its old text stays, and the stop names it; it was the only copy."""
    from loraforge.dataset.caption_edit import UNFINISHED_RECORD, CaptionWriter

    caption = tmp_path / "10_blake" / "0.txt"
    caption.parent.mkdir()
    caption.write_text("blake, armor, sword")
    rename = os.replace

    def interrupted_after(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        rename(src, dst)
        if Path(dst) == caption:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_after)
    writer = CaptionWriter(tmp_path, "tags", record={"remove": ["sword"]})
    with pytest.raises(KeyboardInterrupt), writer:
        writer.write(caption, "blake, armor, sword", "blake, armor")
    monkeypatch.undo()
    assert caption.read_text() == "blake, armor"
    assert (writer.backup_dir / "10_blake" / "0.txt").read_text() == "blake, armor, sword"
    assert (writer.backup_dir / UNFINISHED_RECORD).is_file()  # the rerun goes on with it


def test_two_folders_of_one_concept_keep_their_backups_apart(tmp_path: Path) -> None:
    """`10_mage` and `5_mage` (one concept, two repeat counts) both holding `0.txt`: each
    caption's old text is kept under its own folder, none is lost to the other's backup."""
    from loraforge.dataset.caption_edit import CaptionWriter

    captions = []
    for folder in ("10_mage", "5_mage"):
        caption = tmp_path / folder / "0.txt"
        caption.parent.mkdir()
        caption.write_text(f"mage, from {folder}")
        captions.append(caption)
    with CaptionWriter(tmp_path, "tags") as writer:
        for caption in captions:
            writer.write(caption, caption.read_text(), "mage")
    assert {p.relative_to(writer.backup_dir).as_posix(): p.read_text()
            for p in writer.backup_dir.rglob("*.txt")} == {
        "10_mage/0.txt": "mage, from 10_mage", "5_mage/0.txt": "mage, from 5_mage"}


def test_check_reports_missing_triggers_absorbed_tags_and_near_duplicates(tmp_path: Path,
                                                                           ) -> None:
    folder = _captioned_concept(tmp_path)
    (folder / "bare.txt").write_text("blake, 1girl")
    Image.open(folder / "0.png").save(folder / "dup.png")
    (folder / "dup.txt").write_text("blake, 1girl, copy")
    result = run_cli("dataset", "check", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    advice = "\n".join(summary["advice"])
    assert "blake: 1 of 5 captions lack the trigger 'blake' (e.g. 2)" in advice
    assert "loraforge dataset tags --add-trigger blake" in advice
    assert "blake: '1girl' is in every caption, so training absorbs it into the trigger " \
           "'blake'" in advice
    assert "1 near-duplicate picture(s) in 1 group(s)" in advice
    assert summary["totals"]["near_duplicates"] == 1



def test_check_advice_says_a_group_is_a_kept_picture_and_those_near_it_in_hash_and_colour(
        tmp_path: Path) -> None:
    """The advice said only "perceptual hash within 6 bits", though a group is the picture it
    keeps and those near it in hash and in colours: a re-saved JPEG and a 3% crop are counted,
    the same knight in blue is not."""
    folder = tmp_path / "master_dataset" / "10_knight"
    folder.mkdir(parents=True)
    draw_character(folder / "red.png", RED, "box", 0)
    Image.open(folder / "red.png").save(folder / "red_resaved.jpg", quality=85)
    Image.open(folder / "red.png").crop((8, 8, 256, 256)).save(folder / "red_cropped.png")
    draw_character(folder / "blue.png", BLUE, "box", 0)
    for picture in list(folder.iterdir()):
        picture.with_suffix(".txt").write_text(f"knight, {picture.stem}")
    result = run_cli("dataset", "check", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert "2 near-duplicate picture(s) in 1 group(s), each a picture to keep and those within "\
           "6 bits of its perceptual hash and of about its colours: each copy weighs as another "\
           "picture" in "\n".join(summary["advice"])
    assert summary["totals"]["near_duplicates"] == 2

def test_check_reads_the_keep_tokens_separator_as_dataset_tags_does(tmp_path: Path) -> None:
    """`blake ||| smile` is the tags blake and smile: the trigger is there (`dataset tags
    --add-trigger` changes nothing), and smile, not `blake ||| smile`, is in every caption."""
    folder = tmp_path / "master_dataset" / "10_blake"
    folder.mkdir(parents=True)
    for i, text in enumerate(["blake ||| smile, armor", "blake ||| smile"]):
        draw_character(folder / f"{i}.png", RED, "box", 40 * i - 40)
        (folder / f"{i}.txt").write_text(text)
    result = run_cli("dataset", "check", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["concepts"][0]["top_tags"] == [
        {"tag": "blake", "count": 2}, {"tag": "smile", "count": 2}, {"tag": "armor", "count": 1}]
    advice = "\n".join(summary["advice"])
    assert "lack the trigger" not in advice
    assert "blake: 'smile' is in every caption" in advice
    tags = run_cli("dataset", "tags", "--add-trigger", "--dry-run", cwd=tmp_path)
    assert "dry run: 0 caption(s) would change" in tags.stdout, tags.stdout


def test_check_advice_quotes_a_concept_name_with_a_space(tmp_path: Path) -> None:
    folder = tmp_path / "master_dataset" / "10_blake character"
    folder.mkdir(parents=True)
    draw_character(folder / "0.png", RED, "box", -20)
    (folder / "0.txt").write_text("smile, red hat")
    result = run_cli("dataset", "check", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loraforge dataset tags --add-trigger 'blake character'" in \
        "\n".join(json.loads(result.stdout)["advice"])


def test_check_warns_of_a_concept_name_with_a_comma(tmp_path: Path) -> None:
    folder = tmp_path / "master_dataset" / "10_blake, red"
    folder.mkdir(parents=True)
    draw_character(folder / "0.png", RED, "box", -20)
    result = run_cli("dataset", "check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "the concept name `blake, red` holds a comma" in text
    assert "10_blake_red" in text
