"""`loraforge dataset check` and the scan behind it, on real files, through the real CLI.

Every bad input must give exit code 1, a message naming the file and the fix, no traceback, and
leave every file on disk exactly as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

from loraforge.dataset.check import summarize
from loraforge.dataset.sample import write_sample_dataset
from loraforge.dataset.scan import Dataset, DatasetError, read_caption, scan_dataset
from loraforge.dataset.tags import split_caption
from loraforge.errors import ForgeError

DS = "master_dataset"


# --- helpers --------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "forge.toml").write_text(f'[dataset]\npath = "{DS}"\n', encoding="utf-8")
    return tmp_path


def image(path: Path, size: tuple[int, int] = (320, 288),
          color: tuple[int, int, int] = (90, 20, 20), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}.get(
        path.suffix.lower(), "PNG")
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def caption(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under root: content hash and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (digest, path.stat().st_mtime_ns)
    return state


def check(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("dataset", "check", "--config", project / "forge.toml", *args, cwd=project)


def fails(project: Path, *needles: str) -> str:
    """Run the check; it must fail as a user error naming every needle and change nothing."""
    before = snapshot(project)
    result = check(project)
    assert_user_error(result, *needles)
    assert snapshot(project) == before
    return result.stderr


def good_concept(project: Path, folder: str = "10_blake", n: int = 2) -> Path:
    for i in range(n):
        image(project / DS / folder / f"img{i}.png")
    return project / DS / folder


def _encoded(fmt: str, size: tuple[int, int] = (300, 300)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40).convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


# --- bad input: one CLI run each ----------------------------------------------------------------

def test_missing_dataset_folder(project: Path) -> None:
    err = fails(project, f"{DS}: dataset folder not found", "mkdir -p master_dataset",
                "dataset.path", "loraforge init")
    assert "problems" not in err
    assert not (project / DS).exists()


def test_empty_dataset(project: Path) -> None:
    caption(project / DS / "README.md", "put 10_name folders here\n")  # allowed, not a concept
    fails(project, f"{DS}: has no concept folders", "master_dataset/10_my_character")


def test_folder_without_repeat_prefix(project: Path) -> None:
    image(project / DS / "blake" / "a.png")
    fails(project, f"{DS}/blake: the folder name does not start with a repeat count",
          "mv master_dataset/blake master_dataset/10_blake")


def test_a_rename_onto_an_existing_folder_moves_the_files_and_mends_the_dataset(
        project: Path) -> None:
    """`mv blake 10_blake` beside a `10_blake` would put blake/ inside it, where nothing
    trains: the advice moves the files in instead, and running it gives a dataset that checks.
    A file of the same name is kept, not overwritten."""
    good_concept(project)
    image(project / DS / "blake" / "new.png")
    image(project / DS / "blake" / "img0.png", color=(9, 9, 9))
    err = fails(project, f"{DS}/blake: the folder name does not start with a repeat count")
    command = "mv -n master_dataset/blake/* master_dataset/10_blake/ && rmdir master_dataset/blake"
    assert command in err and "a folder 10_blake is there already" in err, err
    ran = subprocess.run(command, shell=True, cwd=project, capture_output=True, text=True)
    assert ran.returncode != 0  # img0.png is in both: it stays, and so does its folder
    assert (project / DS / "blake" / "img0.png").is_file()
    assert sorted(p.name for p in (project / DS / "10_blake").iterdir()) == [
        "img0.png", "img1.png", "new.png"]
    (project / DS / "blake" / "img0.png").rename(project / DS / "10_blake" / "img2.png")
    (project / DS / "blake").rmdir()
    assert check(project).returncode == 0


def test_zero_repeats(project: Path) -> None:
    image(project / DS / "0_blake" / "a.png")
    fails(project, f"{DS}/0_blake: has 0 repeats",
          "mv master_dataset/0_blake master_dataset/10_blake")


def test_empty_concept_folder(project: Path) -> None:
    good_concept(project)
    (project / DS / "20_empty").mkdir()
    (project / DS / "20_empty" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    fails(project, f"{DS}/20_empty: has no images", "add png, jpg")


def test_zero_byte_image(project: Path) -> None:
    folder = good_concept(project)
    (folder / "broken.png").write_bytes(b"")
    fails(project, f"{DS}/10_blake/broken.png: is empty (0 bytes)", "fix: copy it again")


def test_truncated_png(project: Path) -> None:
    folder = good_concept(project)
    data = _encoded("PNG")
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    fails(project, f"{DS}/10_blake/cut.png: is corrupt or truncated", "fix: copy it again")


def test_truncated_jpeg(project: Path) -> None:
    folder = good_concept(project)
    data = _encoded("JPEG")
    (folder / "cut.JPG").write_bytes(data[: len(data) - 200])
    fails(project, f"{DS}/10_blake/cut.JPG: is corrupt or truncated", "fix: copy it again")


def test_corrupt_png(project: Path) -> None:
    folder = good_concept(project)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    fails(project, f"{DS}/10_blake/bad.png: is a PNG image but its data is corrupt",
          "fix: copy it again")


def test_pdf_with_an_image_extension(project: Path) -> None:
    folder = good_concept(project)
    (folder / "scan.png").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    fails(project, f"{DS}/10_blake/scan.png: is not an image (it is a PDF document)",
          "delete it or move it out of the dataset folder")


def test_html_saved_as_jpg(project: Path) -> None:
    folder = good_concept(project)
    (folder / "download.jpg").write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    fails(project, f"{DS}/10_blake/download.jpg: is not an image (it is an HTML page)")


def test_other_file_in_a_concept_folder(project: Path) -> None:
    folder = good_concept(project)
    (folder / "notes.pdf").write_bytes(b"%PDF-1.7\n")
    fails(project, f"{DS}/10_blake/notes.pdf: is neither an image nor a .txt caption "
          "(it is a PDF document)", "fix: move it out of the dataset folder")


def test_gif_file_must_be_converted(project: Path) -> None:
    folder = good_concept(project)
    Image.new("P", (300, 300), 1).save(folder / "anim.gif")
    fails(project, f"{DS}/10_blake/anim.gif: is a GIF image; dataset images must be png, jpg",
          "convert it to PNG or JPEG")


def test_a_fifo_in_the_dataset_folder_does_not_hang_the_check(project: Path) -> None:
    """Opening a named pipe to sniff it waited for a writer forever, with no output."""
    good_concept(project)
    os.mkfifo(project / DS / "upload.fifo")
    result = run_cli("dataset", "check", cwd=project, timeout=60)
    assert result.returncode == 0, result.stderr


def test_same_stem_images(project: Path) -> None:
    folder = good_concept(project)
    image(folder / "a.png")
    image(folder / "a.jpg")
    caption(folder / "a.txt", "blake, smile")
    fails(project, f"{DS}/10_blake/a.jpg: has the same name as a.png", "caption a.txt",
          "mv master_dataset/10_blake/a.png master_dataset/10_blake/a_2.png")
    image(folder / "a_2.png")  # the rename the fix suggests must not land on a file
    caption(folder / "a_3.txt", "blake, a caption of a picture to come")
    fails(project, f"{DS}/10_blake/a.jpg: has the same name as a.png",
          "mv master_dataset/10_blake/a.png master_dataset/10_blake/a_4.png")


def test_caption_not_utf8(project: Path) -> None:
    folder = good_concept(project)
    (folder / "img0.txt").write_bytes("blake, café, naïve smile".encode("cp1252"))
    fails(project, f"{DS}/10_blake/img0.txt: is not UTF-8 text (it looks like WINDOWS-1252)",
          "save it as UTF-8", "iconv -f WINDOWS-1252 -t UTF-8")


def test_caption_utf16(project: Path) -> None:
    folder = good_concept(project)
    (folder / "img1.txt").write_bytes("blake, smile".encode("utf-16"))
    fails(project, f"{DS}/10_blake/img1.txt: is UTF-16 text, not UTF-8", "save it as UTF-8")


def test_subfolder_in_a_concept_folder(project: Path) -> None:
    folder = good_concept(project)
    image(folder / "extra" / "b.png")
    fails(project, f"{DS}/10_blake/extra: is a folder inside a concept folder",
          "mv master_dataset/10_blake/extra master_dataset/10_extra")


def test_image_directly_in_the_dataset_folder(project: Path) -> None:
    good_concept(project)
    image(project / DS / "stray.png")
    fails(project, f"{DS}/stray.png: is an image outside any concept folder",
          "mv master_dataset/stray.png master_dataset/<repeats>_<concept>/")


def test_every_problem_is_listed_in_one_go(project: Path) -> None:
    folder = good_concept(project)
    (folder / "empty.png").write_bytes(b"")
    (folder / "doc.png").write_bytes(b"%PDF-1.4\n")
    image(project / DS / "alice" / "a.png")
    (project / DS / "5_bob").mkdir()
    caption(folder / "img1.txt", "")  # a warning, printed even though the check fails
    err = fails(project, f"{DS}: 4 problems (nothing was changed):",
                f"{DS}/5_bob: has no images", f"{DS}/10_blake/empty.png: is empty",
                f"{DS}/10_blake/doc.png: is not an image (it is a PDF document)",
                "mv master_dataset/alice master_dataset/10_alice",
                "warning: master_dataset/10_blake/img1.txt: is empty")
    # listed in path order, each with its own fix
    assert err.index("10_blake/doc.png") < err.index("10_blake/empty.png") < err.index("5_bob")
    assert err.count("fix:") == 5


# --- warnings and accepted oddities ---------------------------------------------------------------

def test_warnings_keep_exit_code_zero(project: Path) -> None:
    folder = good_concept(project, n=3)
    caption(folder / "img0.txt", "blake, smile")
    caption(folder / "img1.txt", "  \n")
    caption(folder / "lost.txt", "blake, orphan")
    image(folder / "img2.png", size=(200, 400))
    caption(project / DS / "notes.txt", "my notes")
    before = snapshot(project)
    result = check(project, "--json")
    assert result.returncode == 0, result.stderr
    assert snapshot(project) == before
    err = result.stderr
    assert "warning: master_dataset/10_blake/img1.txt: is empty, so img1.png trains on the " \
           "concept name 'blake' alone" in err
    assert "warning: master_dataset/10_blake/lost.txt: is a caption without an image" in err
    assert "warning: master_dataset/10_blake/img2.png: is only 200x400 px" in err
    assert "is enlarged to its bucket (or, with dataset.bucket_no_upscale = true" in err
    assert "warning: master_dataset/notes.txt: is not a concept folder; ignored" in err
    summary = json.loads(result.stdout)
    (blake,) = summary["concepts"]
    assert blake["images"] == 3
    assert blake["captioned"] == 1
    assert {"tag": "blake", "count": 3} in blake["top_tags"]  # 2 fallbacks + 1 caption
    assert len(summary["warnings"]) == 4


def test_good_dataset_table(project: Path) -> None:
    blake = project / DS / "10_blake_character"
    for i, ext in enumerate([".png", ".JpEg", ".PNG"]):
        image(blake / f"b{i}{ext}")
    caption(blake / "b0.txt", "blake_character, 1boy, smile")
    caption(blake / "b1.txt", "\ufeffblake_character, 1boy\nred hair")  # BOM + line break
    caption(blake / "b2.txt", "blake_character, 1boy, red hair")
    mage = project / DS / "20_mage"
    for i in range(5):
        image(mage / f"m{i}.webp", size=(256, 384))
    (mage / ".DS_Store").write_bytes(b"junk")
    (mage / "Thumbs.db").write_bytes(b"junk")
    (project / DS / ".hidden").mkdir()
    image(mage / "jpeg_named_png.png", fmt="JPEG")
    before = snapshot(project)
    result = check(project)
    assert result.returncode == 0, result.stderr
    assert snapshot(project) == before
    assert result.stderr == ""
    out = result.stdout
    for needle in ("blake_character", "10_blake_character", "20_mage", "images x repeats",
                   "total: 2 concepts, 9 images, 150 images x repeats",
                   "batch size 2: 75 steps per epoch", "10 epochs: 750 total steps",
                   "top tags of blake_character: blake_character (3), 1boy (3), red hair (2)",
                   "advice: mage: 6 images x 20 repeats = 120, below the 200-400",
                   "mv master_dataset/20_mage master_dataset/50_mage"):
        assert needle in out, (needle, out)
    assert "Traceback" not in out


def test_json_numbers(project: Path) -> None:
    good_concept(project, "10_alpha", 3)
    good_concept(project, "20_beta", 5)
    result = check(project, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [c["folder"] for c in summary["concepts"]] == ["10_alpha", "20_beta"]
    assert [(c["name"], c["images"], c["repeats"], c["images_x_repeats"], c["captioned"])
            for c in summary["concepts"]] == [("alpha", 3, 10, 30, 0), ("beta", 5, 20, 100, 0)]
    totals = summary["totals"]
    assert totals["images"] == 8
    assert totals["images_x_repeats"] == 130
    assert totals["steps_per_epoch"] == 65
    assert totals["total_steps"] == 650
    assert summary["concepts"][0]["top_tags"] == [{"tag": "alpha", "count": 3}]


def test_json_on_a_dataset_with_problems_lists_them_and_fails(project: Path) -> None:
    """A pre-flight script reading `--json` got no JSON at all on a bad dataset (only the text on
    stderr), exactly when it needs to know what is wrong."""
    good_concept(project, "10_alpha", 2)
    (project / DS / "10_alpha" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    image(project / DS / "beta" / "b.png")
    result = check(project, "--json")
    assert_user_error(result, "broken.png", "beta")
    found = json.loads(result.stdout)
    assert sorted(Path(p["path"]).name for p in found["problems"]) == ["beta", "broken.png"]
    assert all(p["message"] and p["fix"] for p in found["problems"])
    shutil.rmtree(project / DS)
    missing = check(project, "--json")
    assert_user_error(missing, "dataset folder not found")
    (only,) = json.loads(missing.stdout)["problems"]
    assert "dataset folder not found" in only["message"] and only["fix"]


def test_steps_count_the_global_batch_of_several_training_processes(project: Path) -> None:
    """train.batch_size is per GPU: 4 processes at batch 2 take 8 images per step."""
    good_concept(project, "10_alpha", 3)
    good_concept(project, "20_beta", 5)
    by_flag = check(project, "--processes", "4")
    assert by_flag.returncode == 0, by_flag.stderr
    assert "batch size 8 (2 per process x 4 processes): 17 steps per epoch" in by_flag.stdout
    by_config = json.loads(check(project, "--json", "--set", "train.gpus=2").stdout)["totals"]
    assert (by_config["batch_size"], by_config["processes"]) == (4, 2)
    assert by_config["steps_per_epoch"] == 33
    assert by_config["total_steps"] == 330


def test_json_with_overrides_and_too_many_steps(project: Path) -> None:
    good_concept(project, "10_alpha", 3)
    result = check(project, "--json", "--set", "train.epochs=5000", "--set", "train.batch_size=4")
    summary = json.loads(result.stdout)
    assert summary["totals"]["steps_per_epoch"] == 8
    assert summary["totals"]["total_steps"] == 40000
    assert any("probably a mistake" in a for a in summary["advice"])


def test_check_does_not_import_heavy_libraries() -> None:
    code = ("import sys, loraforge.cli, loraforge.dataset.check, loraforge.dataset.sample; "
            "heavy = {'torch', 'diffusers', 'transformers', 'numpy'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the scan and the summary in-process (fast) ---------------------------------------------

def test_scan_model_and_kohya_metadata(tmp_path: Path) -> None:
    root = tmp_path / DS
    image(root / "20_blake_character" / "b.png", size=(300, 500))
    image(root / "20_blake_character" / "a.png")
    caption(root / "20_blake_character" / "a.txt", "blake_character, 1boy, ,smile,\n")
    image(root / "3_alice" / "x.jpg")
    dataset = scan_dataset(root)
    assert [c.folder_name for c in dataset.concepts] == ["20_blake_character", "3_alice"]
    blake, _ = dataset.concepts
    assert (blake.name, blake.repeats, blake.num_images, blake.captioned) == (
        "blake_character", 20, 2, 1)
    assert [p.path.name for p in blake.images] == ["a.png", "b.png"]
    first, second = blake.images
    assert first.caption == "blake_character, 1boy, smile"
    assert first.caption_path == root / "20_blake_character" / "a.txt"
    assert second.caption_path is None and second.caption == "blake_character"
    assert (second.width, second.height) == (300, 500)
    assert dataset.images_x_repeats == 43
    assert dataset.tag_frequency() == {
        "20_blake_character": {"blake_character": 2, "1boy": 1, "smile": 1},
        "3_alice": {"alice": 1}}
    assert dataset.dataset_dirs() == {"20_blake_character": {"n_repeats": 20, "img_count": 2},
                                      "3_alice": {"n_repeats": 3, "img_count": 1}}
    assert dataset.warnings == []


def test_scan_custom_caption_extension(tmp_path: Path) -> None:
    root = tmp_path / DS
    image(root / "10_a" / "x.png")
    caption(root / "10_a" / "x.caption", "a, tag")
    assert scan_dataset(root, ".caption").concepts[0].images[0].tags == ["a", "tag"]
    with pytest.raises(DatasetError) as info:
        scan_dataset(root, ".txt")
    assert "dataset.caption_extension" in str(info.value)


@pytest.mark.parametrize("name, content, needle", [
    ("cache.npz", b"PK\x03\x04rest", "kohya latent cache"),
    ("photo.jfif", None, "rename it: mv"),
    ("notes", b"", "it is an empty file"),
])
def test_scan_other_files(tmp_path: Path, name: str, content: bytes | None, needle: str) -> None:
    root = tmp_path / DS
    image(root / "10_a" / "x.png")
    if content is None:
        image(root / "10_a" / name, fmt="JPEG")
    else:
        (root / "10_a" / name).write_bytes(content)
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    assert needle in str(info.value)


def test_pose_maps_in_a_concept_folder_are_skipped_not_trained(tmp_path: Path) -> None:
    """`pose extract` writes NAME.pose.png and NAME.pose.json beside a picture, and a pose map
    saved under another name carries loraforge's mark: the maps were trained as pictures of
    the character (only a "small image" warning), the JSON failed the check. Now both are
    skipped, with one warning saying how to move them out."""
    from PIL.PngImagePlugin import PngInfo

    from loraforge.generate.poses import POSE_MARK

    folder = tmp_path / DS / "10_a"
    image(folder / "x.png")
    image(folder / "x.pose.png", (128, 96), (0, 0, 0))
    (folder / "x.pose.json").write_text('{"people": []}', encoding="utf-8")
    marked = PngInfo()
    marked.add_text(*POSE_MARK)
    Image.new("RGB", (128, 96)).save(folder / "skeleton.png", pnginfo=marked)
    dataset = scan_dataset(tmp_path / DS)
    assert [record.path.name for record in dataset.concepts[0].images] == ["x.png"]
    assert dataset.warnings == [
        f"{folder}: 3 loraforge pose map file(s) (skeleton.png, x.pose.json, x.pose.png) are "
        "not pictures of `a`: skipped, not trained; move them out of the dataset folder: "
        f"mkdir -p {tmp_path}/poses && mv -n {folder}/skeleton.png {folder}/x.pose.json "
        f"{folder}/x.pose.png {tmp_path}/poses/"]


def test_pose_maps_written_elsewhere_in_the_dataset_folder_are_skipped_and_moved_out(
        tmp_path: Path) -> None:
    """`pose extract -o master_dataset/` (or a `poses/` folder in it, or in a concept folder):
    the check failed and its fixes made the maps training pictures (a concept `10_poses`, the
    files moved up into the concept folder). Now they are skipped, with how to move them out."""
    root = tmp_path / DS
    image(root / "10_a" / "x.png")
    image(root / "ref.pose.png", (128, 96), (0, 0, 0))
    (root / "poses").mkdir()
    (root / "poses" / "y.pose.json").write_text('{"people": []}', encoding="utf-8")
    image(root / "10_a" / "poses" / "z.pose.png", (128, 96), (0, 0, 0))
    dataset = scan_dataset(root)
    assert [c.name for c in dataset.concepts] == ["a"]
    assert [record.path.name for record in dataset.concepts[0].images] == ["x.png"]
    poses = f"mkdir -p {tmp_path}/poses && mv -n"
    assert dataset.warnings == [
        f"{root}/10_a/poses: holds only loraforge pose maps (1 file(s)), not pictures to train: "
        f"skipped; move it out of the dataset folder: {poses} {root}/10_a/poses/z.pose.png "
        f"{tmp_path}/poses/ && rmdir {root}/10_a/poses",
        f"{root}/poses: holds only loraforge pose maps (1 file(s)), not pictures to train: "
        f"skipped; move it out of the dataset folder: {poses} {root}/poses/y.pose.json "
        f"{tmp_path}/poses/ && rmdir {root}/poses",
        f"{root}/ref.pose.png: is a loraforge pose map, not a picture to train: skipped; move "
        f"it out of the dataset folder: {poses} {root}/ref.pose.png {tmp_path}/poses/"]
    image(root / "poses" / "photo.png")  # not only pose maps: a folder to name as before
    with pytest.raises(DatasetError, match="does not start with a repeat count"):
        scan_dataset(root)
    (root / "poses" / "photo.png").unlink()
    (root / "5_b").mkdir()  # a concept of pose maps only: not trained, so not skipped quietly
    (root / "5_b" / "w.pose.json").write_text('{"people": []}', encoding="utf-8")
    with pytest.raises(DatasetError, match="has no images"):
        scan_dataset(root)


def test_a_wrong_extension_is_renamed_beside_its_own_caption(tmp_path: Path) -> None:
    """`cat.txt` is the caption of `cat.jfif`: the rename keeps the stem, so the caption still
    belongs to it; only another picture already called cat.jpg sends it to a free name."""
    root = tmp_path / DS
    image(root / "10_cat" / "cat.jfif", fmt="JPEG")
    caption(root / "10_cat" / "cat.txt", "cat, sitting")
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    assert f"mv {root}/10_cat/cat.jfif {root}/10_cat/cat.jpg" in str(info.value)
    image(root / "10_cat" / "cat.jpg")
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    assert f"mv {root}/10_cat/cat.jfif {root}/10_cat/cat_2.jpg" in str(info.value)


def test_scan_broken_link_and_orphan_hint(tmp_path: Path) -> None:
    root = tmp_path / DS
    image(root / "10_a" / "x.png")
    caption(root / "10_a" / "x.png.txt", "a")
    assert "it should be named x.txt" in scan_dataset(root).warnings[0]
    (root / "10_a" / "gone.png").symlink_to(root / "nowhere.png")
    with pytest.raises(DatasetError, match="is a broken link"):
        scan_dataset(root)


def test_folder_name_parsing_problems(tmp_path: Path) -> None:
    root = tmp_path / DS
    image(root / "10" / "x.png")
    image(root / "7_" / "x.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(root)
    text = str(info.value)
    assert "repeat count but no concept name" in text
    assert "no concept name after the repeat count" in text


def test_read_caption_rules(tmp_path: Path) -> None:
    assert split_caption(" a, b ,,\r\nc\n") == ["a", "b", "c"]
    path = tmp_path / "c.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ForgeError, match="is not a caption \\(it is a PNG image\\)"):
        read_caption(path)


def _dataset_with(counts: list[tuple[int, int]], tmp_path: Path) -> Dataset:
    root = tmp_path / DS
    for i, (repeats, n) in enumerate(counts):
        for j in range(n):
            image(root / f"{repeats}_c{i}" / f"{j}.png", size=(8, 8))
    return scan_dataset(root)


def test_summarize_advice_and_max_steps(tmp_path: Path) -> None:
    dataset = _dataset_with([(30, 10), (1, 3)], tmp_path)
    summary = summarize(dataset, batch_size=3, epochs=4, max_steps=123)
    assert summary["totals"]["images_x_repeats"] == 303
    assert summary["totals"]["steps_per_epoch"] == 101
    assert summary["totals"]["total_steps"] == 123
    advice = "\n".join(summary["advice"])
    assert "c0" not in advice  # 300: in range
    assert "c1: 3 images x 1 repeats = 3, below" in advice
    assert "100 repeats would give 300 (any of 67 to 133 lands in range)" in advice
    json.dumps(summary)


def test_summarize_large_concept(tmp_path: Path) -> None:
    dataset = _dataset_with([(2, 250)], tmp_path)
    advice = summarize(dataset, 2, 10)["advice"]
    assert advice and "1 repeats would give 250" in advice[0]


# --- the sample dataset -------------------------------------------------------------------------

def test_sample_dataset_passes_and_is_deterministic(
        project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    written = write_sample_dataset(project / DS)
    folders = sorted(p.name for p in (project / DS).iterdir())
    assert folders == ["10_blue_mage", "10_red_knight"]
    assert len(written) == len(set(written)) and all(p.exists() for p in written)
    captions = [p for p in written if p.suffix == ".txt"]
    assert captions and all(p.read_text().split(",")[0] in p.parent.name for p in captions)

    other = tmp_path_factory.mktemp("again")
    write_sample_dataset(other)
    assert {str(p.relative_to(other)): p.read_bytes() for p in other.rglob("*") if p.is_file()} \
        == {str(p.relative_to(project / DS)): p.read_bytes() for p in written}

    before = snapshot(project)
    assert write_sample_dataset(project / DS) == []  # never overwrites
    assert snapshot(project) == before

    result = check(project, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    summary = json.loads(result.stdout)
    assert [c["name"] for c in summary["concepts"]] == ["blue_mage", "red_knight"]
    assert all(c["images"] >= 6 and c["captioned"] == c["images"] for c in summary["concepts"])
    assert [c["top_tags"][0]["tag"] for c in summary["concepts"]] == ["blue_mage", "red_knight"]
    sizes = {Image.open(p).size for p in written if p.suffix != ".txt"}
    assert len(sizes) >= 4  # varied aspect ratios for bucketing
