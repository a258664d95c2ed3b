"""Pose maps from pictures: the body network's published layout, parsing heatmaps and part
affinity fields into people, the tiny detector, `loraforge pose extract` and photos in generate.

No real OpenPose weights can be downloaded here, so no test runs our network with them. The
parsing is checked on maps synthesised the way the network was trained to draw them (Gaussian
peaks at the keypoints, unit vectors along each limb) from known people; and a real photograph
goes through the whole body path with a real trained detector (MediaPipe's BlazePose, weights
from its wheel, in its own environment) standing in for the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image, ImageDraw

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.generate.poses import (
    Person,
    PoseMap,
    draw_pose,
    looks_like_pose_map,
    random_pose,
    read_pose_json,
)

# --- the network --------------------------------------------------------------------------------

def _published_shapes() -> dict[str, tuple[int, ...]]:
    """The COCO body model's convolutions as Cao et al. (2017) describe them, with the names its
    released weights use: a VGG-19 trunk to conv4_2, two CPM layers, then 6 stages of a PAF (L1,
    38 channels) and a heatmap (L2, 19 channels) branch."""
    convs = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3),
             ("conv2_2", 128, 128, 3), ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3),
             ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), ("conv4_1", 256, 512, 3),
             ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]
    for branch, out in (("L1", 38), ("L2", 19)):
        convs += [(f"conv5_{i}_CPM_{branch}", 128, 128, 3) for i in (1, 2, 3)]
        convs += [(f"conv5_4_CPM_{branch}", 128, 512, 1), (f"conv5_5_CPM_{branch}", 512, out, 1)]
        for stage in range(2, 7):
            convs += [(f"Mconv1_stage{stage}_{branch}", 185, 128, 7)]
            convs += [(f"Mconv{i}_stage{stage}_{branch}", 128, 128, 7) for i in (2, 3, 4, 5)]
            convs += [(f"Mconv6_stage{stage}_{branch}", 128, 128, 1),
                      (f"Mconv7_stage{stage}_{branch}", 128, out, 1)]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, k in convs:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)
    return shapes


def test_the_network_has_the_published_parameter_names_and_shapes() -> None:
    import torch

    from loraforge.models.bodypose import build_network

    with torch.device("meta"):
        state = build_network().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _published_shapes()
    # 209.2 MB of float32: the size of the released body_pose_model.pth.
    assert sum(v.numel() for v in state.values()) == 52_311_446
    with torch.device("meta"):
        fields, heatmaps = build_network()(torch.zeros(1, 3, 368, 496))
    assert fields.shape == (1, 38, 46, 62) and heatmaps.shape == (1, 19, 46, 62)


def _tiny_state() -> dict[str, object]:
    import torch

    from loraforge.models.bodypose import build_network
    from loraforge.models.tiny_detector import WIDTHS

    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_network(WIDTHS).state_dict().items()}


def _grouped(key: str) -> str:
    """The key as conversions that keep the layers in groups name it: model0 (the trunk),
    model<stage>_<1 for L1, 2 for L2>."""
    name = key.split(".")[0]
    if not name.startswith(("conv5_", "Mconv")):
        return f"model0.{key}"
    stage = 1 if name.startswith("conv5_") else int(name.split("_stage")[1][0])
    return f"model{stage}_{1 if name.endswith('_L1') else 2}.{key}"


def test_a_released_pth_converted_by_models_fetch_loads_with_either_key_style(tmp_path: Path,
                                                                                ) -> None:
    """`models fetch openpose-detector` converts the pickle to safetensors; the network loads it
    whether its keys are plain (`conv1_1.weight`) or grouped (`model0.conv1_1.weight`)."""
    import torch

    from loraforge.models.bodypose import load_detector
    from loraforge.models.catalog import by_key
    from loraforge.models.fetch import _convert_detector

    state = _tiny_state()
    picture = torch.rand(1, 3, 64, 48) - 0.5
    outputs = []
    for grouped in (False, True):
        keys = {k: _grouped(k) if grouped else k for k in state}
        pth = tmp_path / f"body_pose_model_{grouped}.pth"
        torch.save({keys[k]: v for k, v in state.items()}, pth)
        folder = tmp_path / f"detector_{grouped}"
        folder.mkdir()
        model = by_key("openpose-detector")
        assert model is not None
        _convert_detector(pth, folder / "body_pose_model.safetensors", model, "0" * 40)
        with torch.no_grad():
            outputs.append(load_detector(folder)(picture))
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def test_a_detector_file_that_is_not_the_body_network_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from loraforge.models.bodypose import load_detector

    with pytest.raises(ForgeError, match="missing") as missing:
        load_detector(tmp_path)
    assert "models fetch openpose-detector" in str(missing.value)
    state = _tiny_state()
    (tmp_path / "body_pose_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ForgeError, match="cannot be read as safetensors"):
        load_detector(tmp_path)
    save_file({"weight": state["conv1_1.weight"]}, str(tmp_path / "body_pose_model.safetensors"))
    with pytest.raises(ForgeError, match="not an OpenPose body network"):
        load_detector(tmp_path)
    del state["Mconv7_stage6_L2.bias"]
    save_file(state, str(tmp_path / "body_pose_model.safetensors"))
    with pytest.raises(ForgeError, match=r"1 weights missing \(first: Mconv7_stage6_L2\.bias\)"):
        load_detector(tmp_path)


def test_the_tiny_detector_is_rebuilt_bit_for_bit(tmp_path: Path) -> None:
    from loraforge.models.tiny_detector import build_tiny_detector, ensure_tiny_detector

    folder = ensure_tiny_detector(tmp_path / "store")
    again = tmp_path / "again"
    again.mkdir()
    build_tiny_detector(again)
    digest = [hashlib.sha256((f / "body_pose_model.safetensors").read_bytes()).hexdigest()
              for f in (folder, again)]
    assert digest[0] == digest[1]
    assert json.loads((folder / "manifest.json").read_text())["kind"] == "detector"
    assert ensure_tiny_detector(tmp_path / "store") == folder


# --- parsing maps into people -------------------------------------------------------------------

def _synthetic_maps(pose: PoseMap, sigma: float = 7.0, limb_width: float = 8.0,
                    ) -> tuple[object, object]:
    """The stride-8 outputs a perfect network gives for ``pose``, built as the training targets
    were: per keypoint a Gaussian peak (max over people); per limb the unit vector from its
    first to its second keypoint within ``limb_width`` px of the segment (mean over people);
    the background heatmap is 1 - the strongest keypoint."""
    import torch

    from loraforge.generate.skeletons import FIELD_CHANNELS, LIMB_PAIRS

    h8, w8 = math.ceil(pose.height / 8), math.ceil(pose.width / 8)
    ys, xs = np.mgrid[0:h8, 0:w8] * 8.0 + 3.5  # the pixel each stride-8 cell stands for
    heat = np.zeros((19, h8, w8))
    fields = np.zeros((38, h8, w8))
    counts = np.zeros((len(LIMB_PAIRS), h8, w8))
    for person in pose.people:
        for k, p in enumerate(person.keypoints):
            if p is not None:
                peak = np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / (2 * sigma ** 2))
                heat[k] = np.maximum(heat[k], peak)
        for i, ((a, b), (cx, cy)) in enumerate(zip(LIMB_PAIRS, FIELD_CHANNELS, strict=True)):
            pa, pb = person[a], person[b]
            if pa is None or pb is None:
                continue
            vx, vy = pb[0] - pa[0], pb[1] - pa[1]
            length = math.hypot(vx, vy)
            ux, uy = vx / length, vy / length
            along = (xs - pa[0]) * ux + (ys - pa[1]) * uy
            across = np.abs((xs - pa[0]) * uy - (ys - pa[1]) * ux)
            on = (along >= 0) & (along <= length) & (across <= limb_width)
            fields[cx][on] += ux
            fields[cy][on] += uy
            counts[i][on] += 1
    for i, (cx, cy) in enumerate(FIELD_CHANNELS):
        fields[[cx, cy]] /= np.maximum(counts[i], 1)
    heat[18] = 1 - heat[:18].max(axis=0)
    return torch.from_numpy(fields).float(), torch.from_numpy(heat).float()


def _parse(pose: PoseMap) -> list[Person]:
    from loraforge.generate.skeletons import people_from_maps, upsample

    fields, heat = upsample(*_synthetic_maps(pose), pose.width, pose.height)
    return people_from_maps(fields, heat)


def _assert_recovered(found: list[Person], expected: tuple[Person, ...], tolerance: float,
                      ) -> None:
    assert len(found) == len(expected)
    for got in found:  # each found person is one of the expected, keypoint for keypoint
        neck = got.keypoints[1]
        assert neck is not None
        ref = min(expected, key=lambda e: math.dist(e.keypoints[1] or (1e9, 1e9), neck))
        assert got.present() == ref.present()
        for p, q in zip(got.keypoints, ref.keypoints, strict=True):
            if p is not None and q is not None:
                assert math.dist(p, q) <= tolerance, (p, q)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parsing_recovers_every_person_from_ideal_maps(seed: int) -> None:
    """Three people side by side, 656x368 (the network's input box): each comes back whole, each
    keypoint within 3 px, left to right."""
    pose = random_pose(3, 656, 368, seed)
    found = _parse(pose)
    _assert_recovered(found, pose.people, tolerance=3.0)
    lefts = [min(p[0] for p in person.keypoints if p is not None) for person in found]
    assert lefts == sorted(lefts)


def test_parsing_keeps_partly_visible_people_and_drops_fragments() -> None:
    """A person cut off at the hips keeps their upper body, without invented legs; a stray
    arm (three keypoints) is not a person."""
    first, second = random_pose(2, 656, 368, 7).people
    legs = (9, 10, 12, 13)
    cut = Person(tuple(None if i in legs else p for i, p in enumerate(first.keypoints)))
    arm = Person(tuple(p if i in (2, 3, 4) else None for i, p in enumerate(second.keypoints)))
    found = _parse(PoseMap(656, 368, (cut, arm)))
    _assert_recovered(found, (cut,), tolerance=3.0)


def test_parsing_flat_maps_finds_nobody() -> None:
    from loraforge.generate.skeletons import people_from_maps

    assert people_from_maps(np.zeros((38, 64, 80)), np.full((19, 64, 80), 0.5)) == []


# --- pictures -------------------------------------------------------------------------------------

def _figures(path: Path, size: tuple[int, int] = (640, 480)) -> Path:
    """A picture of two drawn figures (the tiny detector, random as it is, finds people in it)."""
    image = Image.new("RGB", size, (200, 210, 220))
    draw = ImageDraw.Draw(image)
    sx, sy = size[0] / 640, size[1] / 480
    for x in (150, 420):
        draw.ellipse(((x - 30) * sx, 60 * sy, (x + 30) * sx, 120 * sy), fill=(230, 190, 160))
        draw.rectangle(((x - 50) * sx, 130 * sy, (x + 50) * sx, 300 * sy), fill=(40, 60, 160))
        draw.rectangle(((x - 45) * sx, 300 * sy, (x + 45) * sx, 440 * sy), fill=(60, 40, 30))
    image.save(path)
    return path


def _tiny_settings(root: Path, *more: str) -> object:
    return load_settings(None, [f"storage.root={root}", "models.detector=tiny", *more])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loraforge.models.tiny_detector import ensure_tiny_detector

    root = tmp_path_factory.mktemp("detector_store")
    ensure_tiny_detector(root)
    return root


def test_pose_extract_writes_the_map_and_json_at_the_scene_size(tmp_path: Path,
                                                                tiny_root: Path) -> None:
    picture = _figures(tmp_path / "ref.jpg")
    result = run_cli("pose", "extract", picture, "--size", "512x512", "--set",
                     f"storage.root={tiny_root}", "--set", "models.detector=tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png, js = tmp_path / "ref.pose.png", tmp_path / "ref.pose.json"
    assert f"{picture} -> {png}" in result.stdout
    pose = read_pose_json(js)
    assert (pose.width, pose.height) == (512, 512) and pose.people
    # The JSON draws to exactly the PNG written, so editors and --pose see the same figures.
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(draw_pose(pose)))
    assert looks_like_pose_map(Image.open(png))[0]
    # Letterboxed: a 4:3 picture on a square canvas keeps its keypoints within the picture band.
    ys = [p[1] for person in pose.people for p in person.keypoints if p is not None]
    assert min(ys) >= 64 - 1 and max(ys) <= 448 + 1


def test_pose_extract_a_folder_goes_on_past_bad_pictures(tmp_path: Path, tiny_root: Path,
                                                         ) -> None:
    """The summary counted a picture that could not be read as one without a pose (a user looks
    for a detection problem), and read "(1 people)"."""
    folder = tmp_path / "refs"
    folder.mkdir()
    _figures(folder / "a.png", (320, 240))  # one person to the tiny detector
    Image.new("RGB", (320, 240), (128, 128, 128)).save(folder / "b_empty_room.png")
    (folder / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.txt").write_text("not a picture")
    out = tmp_path / "poses"
    result = run_cli("pose", "extract", folder, "-o", out, "--set", f"storage.root={tiny_root}",
                     "--set", "models.detector=tiny", cwd=tmp_path)
    assert_user_error(result, "b_empty_room.png: no person found", "c.jpg: is corrupt",
                      "3 pictures: 1 extracted (1 person), 1 without a pose: b_empty_room.png; "
                      "1 unreadable: c.jpg")
    assert sorted(p.name for p in out.iterdir()) == ["a.pose.json", "a.pose.png"]


def test_pose_extract_skips_its_own_outputs_and_files_that_are_not_pictures(
        tmp_path: Path, tiny_root: Path) -> None:
    """`pose extract pics/*` after a first run: the earlier NAME.pose.png/.json and a text
    file are skipped with a line each, not extracted or refused; a lone non-picture is one
    error; `-o` naming a folder (no extension) takes the pose map of one picture."""
    pics = tmp_path / "pics"
    pics.mkdir()
    _figures(pics / "a.png")
    (pics / "notes.txt").write_text("not a picture")
    store = ("--set", f"storage.root={tiny_root}", "--set", "models.detector=tiny")
    first = run_cli("pose", "extract", pics / "a.png", *store, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    written = {p.name: p.read_bytes() for p in pics.iterdir()}
    every = sorted(pics.iterdir())
    result = run_cli("pose", "extract", *every, "--overwrite", *store, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for needle in ("a.pose.json: skipped (a pose map or JSON that pose extract wrote)",
                   "a.pose.png: skipped (a pose map or JSON that pose extract wrote)",
                   "notes.txt: skipped (not a picture", "1 picture: 1 extracted"):
        assert needle in result.stdout, (needle, result.stdout)
    assert {p.name: p.read_bytes() for p in pics.iterdir()} == written
    assert_user_error(run_cli("pose", "extract", pics / "notes.txt", *store, cwd=tmp_path),
                      "notes.txt: not a picture")
    into = run_cli("pose", "extract", pics / "a.png", "-o", tmp_path / "poses", *store,
                   cwd=tmp_path)
    assert into.returncode == 0, into.stderr
    assert sorted(p.name for p in (tmp_path / "poses").iterdir()) == ["a.pose.json",
                                                                      "a.pose.png"]


def test_pose_extract_writes_with_storage_file_mode(tmp_path: Path, tiny_root: Path) -> None:
    """storage.file_mode = "0664" (a lab's shared folder): the map and JSON were 0644."""
    from loraforge.generate.extract import extract_command

    picture = _figures(tmp_path / "ref.png", (160, 120))
    extract_command(_tiny_settings(tiny_root, "storage.file_mode=0664"), [picture], None, None,
                    "64x64", lambda _: None)
    assert [(tmp_path / name).stat().st_mode & 0o777
            for name in ("ref.pose.png", "ref.pose.json")] == [0o664, 0o664]


def test_a_rerun_keeps_what_was_extracted_and_never_replaces_an_edited_json(
        tmp_path: Path, tiny_root: Path) -> None:
    """A rerun detected every picture again and replaced each map and JSON, one edited in a
    pose editor since included, and a batch stopped by preemption started over. Now a picture
    whose map and JSON are there is kept; --overwrite extracts again, but not over an edited
    JSON, and says so."""
    from loraforge.generate.extract import extract_command

    refs = tmp_path / "refs"
    refs.mkdir()
    for name in "ab":
        _figures(refs / f"{name}.png", (160, 120))
    settings = _tiny_settings(tiny_root)
    extract_command(settings, [refs / "a.png"], None, None, "64x64", lambda _: None)
    edited = refs / "a.pose.json"
    pose = json.loads(edited.read_text())
    pose["people"] = pose["people"][:1]  # the user's work in a pose editor
    edited.write_text(json.dumps(pose))
    mine = edited.read_bytes()
    said: list[str] = []
    extract_command(settings, [refs], None, None, "64x64", said.append)  # b: not done yet
    assert [line.split(" -> ")[0] for line in said[:-1]] == [str(refs / "b.png")]
    assert said[-1].startswith("2 pictures: 1 extracted")
    assert ", 1 already extracted, kept (--overwrite extracts them again)" in said[-1]
    said.clear()
    extract_command(settings, [refs / "a.png"], None, None, "64x64", said.append,
                    overwrite=True)
    assert said == [f"{refs / 'a.png'}: kept, not extracted again: {edited} was changed since "
                    "pose extract wrote it (in a pose editor?); move that JSON away (or delete "
                    "it) to extract the picture again"]
    assert edited.read_bytes() == mine

    # b's map made at another size, or from another picture under its name, is not "already
    # extracted": it is made again (its JSON is ours); a's edited JSON is still kept
    said.clear()
    extract_command(settings, [refs], None, None, "96x64", said.append)
    assert said[-1].startswith("2 pictures: 1 extracted") and "already" not in said[-1]
    assert json.loads((refs / "b.pose.json").read_text())["canvas_width"] == 96
    assert edited.read_bytes() == mine
    _figures(refs / "b.png", (200, 150))  # another picture under b's name
    said.clear()
    extract_command(settings, [refs / "b.png"], None, None, "96x64", said.append)
    assert not [line for line in said if "already extracted" in line], said

    # a map a pose editor saved again (its mark gone) keeps its picture out, with a line; the
    # batch goes on with a new picture
    from PIL import Image

    with Image.open(refs / "b.pose.png") as im:
        im.load()
        im.save(refs / "b.pose.png")
    _figures(refs / "c.png", (160, 120))
    said.clear()
    extract_command(settings, [refs], None, None, "96x64", said.append)
    assert (refs / "c.pose.png").is_file() and said[-1].startswith("3 pictures: 1 extracted")
    assert any(line.startswith(f"{refs / 'b.png'}: kept, not extracted again") for line in said)


def test_pose_extract_passes_over_os_clutter_and_lists_every_name_clash(
        tmp_path: Path, tiny_root: Path) -> None:
    """A folder copied from a Mac: its ._a.png (AppleDouble), .DS_Store and Thumbs.db were read
    as pictures ("is not an image") and the batch exited 1, a SLURM job marked failed. Name
    clashes were refused one per run."""
    from loraforge.generate.extract import extract_command

    refs = tmp_path / "refs"
    refs.mkdir()
    _figures(refs / "a.png", (160, 120))
    (refs / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (refs / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (refs / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    said: list[str] = []
    extract_command(_tiny_settings(tiny_root), [refs], None, None, "64x64", said.append)
    assert said[-1].startswith("1 picture: 1 extracted") and len(said) == 2
    clashes = tmp_path / "clashes"
    clashes.mkdir()
    for name in ("anim.png", "anim.webp", "b.jpg", "b.png"):
        Image.new("RGB", (8, 8)).save(clashes / name)
    with pytest.raises(ForgeError) as refused:
        extract_command(_tiny_settings(tiny_root), [clashes], None, None, None, lambda _: None)
    assert refused.value.message == ("anim.png and anim.webp would both write anim.pose.png; "
                                     "b.jpg and b.png would both write b.pose.png")
    assert refused.value.path == clashes


def test_pose_extract_never_writes_into_a_dataset_concept_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pose extract master_dataset/10_red_knight` wrote NAME.pose.png beside the training
    pictures: moved or not, skeleton maps would train as the character. -o elsewhere is fine."""
    from loraforge.generate.extract import extract_command

    monkeypatch.chdir(tmp_path)
    concept = tmp_path / "master_dataset" / "10_red_knight"
    concept.mkdir(parents=True)
    picture = _figures(concept / "knight.png", (160, 120))
    settings = load_settings(None, [f"storage.root={tmp_path / 'nothing'}",
                                    f"dataset.path={tmp_path / 'master_dataset'}"])
    photo = _figures(tmp_path / "photo.png", (160, 120))
    for inputs, output in (([concept], None), ([picture], None), ([photo], concept)):
        with pytest.raises(ForgeError) as refused:
            extract_command(settings, inputs, output, None, None, lambda _: None)
        assert refused.value.message == ("is a concept folder of the training dataset: pose "
                                         "maps written here would be trained as the concept's "
                                         "pictures")
        assert refused.value.path == concept and "-o poses/" in (refused.value.fix or "")
    with pytest.raises(ForgeError, match="pose detector not found"):  # past the check
        extract_command(settings, [concept], tmp_path / "poses", None, None, lambda _: None)
    assert sorted(p.name for p in concept.iterdir()) == ["knight.png"]


def test_pose_extract_never_writes_anywhere_in_the_dataset_folder(tmp_path: Path,
                                                                 tiny_root: Path) -> None:
    """-o master_dataset/, master_dataset/poses/ or master_dataset/10_alice/poses/ was accepted
    (only a concept folder itself was refused): `dataset check` then stopped training, and its
    fixes would have moved the pose maps into a concept. Refused wherever in the dataset folder,
    by whichever path, -o or --pose-json, naming a poses/ folder beside it."""
    dataset = tmp_path / "master_dataset"
    (dataset / "10_alice").mkdir(parents=True)
    Image.new("RGB", (64, 64), (90, 30, 30)).save(dataset / "10_alice" / "a.png")
    (tmp_path / "ds").symlink_to(dataset)
    photo = _figures(tmp_path / "photo.png", (160, 120))
    store = ("--set", f"dataset.path={dataset}", "--set", f"storage.root={tiny_root}",
             "--set", "models.detector=tiny")
    inside = ("is inside the training dataset folder (master_dataset, dataset.path): pose maps "
              "written here would be mixed into the training data")
    cases = [
        (("-o", "master_dataset/"), "master_dataset: is the training dataset folder",
         "-o poses/"),
        (("-o", "master_dataset/poses/"), f"master_dataset/poses: {inside}", "-o poses/"),
        (("-o", "master_dataset/10_alice/poses/r.png"), f"master_dataset/10_alice/poses: {inside}",
         "-o poses/"),
        (("-o", "ds/poses/"), f"ds/poses: {inside}", "-o poses/"),
        (("-o", "maps/r.png", "--pose-json", "master_dataset/r.json"),
         "master_dataset: is the training dataset folder", "--pose-json poses/r.json"),
    ]
    for options, message, example in cases:
        assert_user_error(run_cli("pose", "extract", photo, *options, *store, cwd=tmp_path),
                          message, f"fix: write them outside the dataset folder, e.g. {example}")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file()) == ["master_dataset/10_alice/a.png", "photo.png"]


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A folder of one picture where no file can be made, as read-only reference photos on lab
    storage: mode 0555, and for root (whom modes do not stop) the immutable attribute."""
    folder = tmp_path / "refs"
    folder.mkdir()
    _figures(folder / "a.png", (160, 120))
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        if os.access(folder, os.W_OK) and not immutable:
            pytest.skip("no way to make a folder unwritable here (root without chattr)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_pose_extract_into_an_unwritable_folder_is_refused_before_any_detection(
        read_only: Path) -> None:
    """Read-only reference photos: the detector ran on every picture, every write failed, and
    the summary said "0 extracted, ... the others were written"."""
    from loraforge.generate.extract import extract_command

    settings = load_settings(None, [f"storage.root={read_only.parent / 'nothing'}"])
    with pytest.raises(ForgeError) as refused:  # before the (missing) detector is looked for
        extract_command(settings, [read_only], None, None, None, lambda _: None)
    assert refused.value.message.startswith("cannot be written: ")
    assert refused.value.path == read_only and "-o DIR" in (refused.value.fix or "")
    assert sorted(p.name for p in read_only.iterdir()) == ["a.png"]


def test_a_batch_counts_the_pictures_it_could_not_write(tmp_path: Path, tiny_root: Path,
                                                       ) -> None:
    from loraforge.generate.extract import extract_command

    refs = tmp_path / "refs"
    refs.mkdir()
    _figures(refs / "a.png", (160, 120))
    (refs / "a.pose.png").mkdir()  # in the way of the map: its write fails
    with pytest.raises(ForgeError) as failed:
        extract_command(_tiny_settings(tiny_root), [refs], None, None, "64x64", lambda _: None)
    assert failed.value.message == ("1 picture: 0 extracted (0 people), 0 without a pose; "
                                    "1 not written: a.png")
    assert "were written" not in (failed.value.fix or "")


def test_pose_extract_refuses_bad_outputs_before_any_work(tmp_path: Path) -> None:
    from loraforge.generate.extract import extract_command

    settings = load_settings(None, [f"storage.root={tmp_path / 'nothing'}"])
    picture = _figures(tmp_path / "ref.png")
    _figures(tmp_path / "ref.jpg")
    other = _figures(tmp_path / "other.png")
    (tmp_path / "mine.json").write_text('{"mine": 1}')  # the user's: -o mine.png keeps it
    (tmp_path / "other.pose.json").write_text("[]")
    cases = [
        (([picture], tmp_path / "map.jpg", None), "written as PNG"),
        (([picture], picture, None), "would overwrite the picture"),
        (([picture], None, tmp_path / "ref.pose.png"), "needs its own .json name"),
        (([picture, other], None, tmp_path / "x.json"), "--pose-json names one file"),
        (([picture, other], tmp_path / "x.png", None), "-o must be a folder"),
        (([tmp_path / "missing.png"], None, None), "no such file"),
        (([picture, tmp_path / "ref.jpg"], None, None), "ref.png and ref.jpg would both write"),
        (([picture], tmp_path / "mine.png", None),
         "(?s)mine.json: exists and is not an OpenPose JSON file.*--pose-json .*mine.pose.json"),
    ]
    for (inputs, output, json_out), needle in cases:
        with pytest.raises(ForgeError, match=needle):
            extract_command(settings, inputs, output, json_out, None, lambda _: None)
    # in a batch, a picture with a file of the user's at an output is kept, said, and the
    # others are extracted (here: the missing detector is the next thing said)
    lines: list[str] = []
    with pytest.raises(ForgeError, match="pose detector not found"):
        extract_command(settings, [picture, other], None, None, None, lines.append)
    assert [line for line in lines if line.startswith(f"{other}: kept, not extracted again")
            and "other.pose.json" in line], lines
    with pytest.raises(ForgeError, match="pose detector not found") as missing:
        extract_command(settings, [picture], None, None, None, lambda _: None)
    assert "models fetch openpose-detector" in str(missing.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json", "other.png",
                                                          "other.pose.json", "ref.jpg",
                                                          "ref.png"]


def test_one_picture_is_refused_when_a_json_of_the_users_is_at_its_output(
        tmp_path: Path, tiny_root: Path) -> None:
    """An OpenPose JSON of the user's at --pose-json (or beside -o) printed "kept, not extracted
    again (it was made from another picture ...)" and exited 0 with no pose map written: a job
    chaining into `generate --pose` went on. Refused up front, naming the option to change."""
    refs = tmp_path / "refs"
    refs.mkdir()
    photo = _figures(refs / "photo one.png", (160, 120))
    editors = json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": [1, 2, 1]}],
                          "canvas_width": 512, "canvas_height": 512})
    for name in ("mine.json", "new.json"):
        (refs / name).write_text(editors)
    store = ("--set", f"storage.root={tiny_root}", "--set", "models.detector=tiny")
    unknown = ("exists and is not known to be the JSON pose extract wrote (no pose map beside it "
               "records it): extracting would replace it")
    named = run_cli("pose", "extract", photo, "-o", "refs/new.png", "--pose-json",
                    "refs/mine.json", *store, cwd=tmp_path)
    assert_user_error(named, f"refs/mine.json: {unknown}", "fix: pass another --pose-json name")
    beside = run_cli("pose", "extract", photo, "-o", "refs/new.png", *store, cwd=tmp_path)
    assert_user_error(beside, f"refs/new.json: {unknown}",
                      "fix: name the JSON with --pose-json (e.g. --pose-json refs/new.pose.json)")
    assert "kept" not in named.stdout + beside.stdout
    assert sorted(p.name for p in refs.iterdir()) == ["mine.json", "new.json", "photo one.png"]
    assert {(refs / name).read_text() for name in ("mine.json", "new.json")} == {editors}


def test_a_json_file_of_the_users_at_pose_json_names_pose_json_in_its_fix(tmp_path: Path,
                                                                         ) -> None:
    """A file of the user's at --pose-json was refused with "fix: pass another output name
    (-o)", by pose extract and pose random alike: the option to change is --pose-json."""
    photo = _figures(tmp_path / "photo.png", (160, 120))
    (tmp_path / "user.json").write_text('{"x": 1}')
    store = ("--set", f"storage.root={tmp_path / 'nothing'}")
    for command in (("pose", "extract", photo, "-o", "p1.png", "--overwrite", *store),
                    ("pose", "random", "-o", "p1.png")):
        result = run_cli(*command, "--pose-json", "user.json", cwd=tmp_path)
        assert_user_error(result, "user.json: exists and is not an OpenPose JSON file",
                          "--pose-json")
        assert "(-o)" not in result.stderr + result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "user.json"]
    assert (tmp_path / "user.json").read_text() == '{"x": 1}'


def test_a_huge_photo_is_decoded_small(tmp_path: Path) -> None:
    """A 6000x4000 JPEG is decoded at 1/4 scale (1500x1000, 4.5 MB instead of 72 MB), still
    more than the network's 552x368 input needs."""
    from loraforge.generate.extract import input_size, load_picture

    picture = load_picture(_figures(tmp_path / "huge.jpg", (6000, 4000)))
    assert picture.size == (1500, 1000)
    assert input_size(*picture.size) == (552, 368)


def test_keypoints_come_back_in_the_pictures_pixels(tmp_path: Path, tiny_root: Path) -> None:
    """The same people as from a copy at the network's input size, scaled up."""
    from loraforge.generate.extract import Detector, input_size, load_picture

    path = _figures(tmp_path / "big.png", (1024, 768))
    picture = load_picture(path)
    assert input_size(*picture.size) == (491, 368)
    detector = Detector(_tiny_settings(tiny_root))
    big = detector.people(picture, path)
    small_path = tmp_path / "small.png"
    picture.resize((491, 368), Image.Resampling.BICUBIC).save(small_path)
    small = detector.people(load_picture(small_path), small_path)
    assert (big.width, big.height) == (1024, 768) and len(big.people) == len(small.people)
    sx, sy = 1024 / 491, 768 / 368
    for a, b in zip(big.people, small.people, strict=True):
        for p, q in zip(a.keypoints, b.keypoints, strict=True):
            assert (p is None) == (q is None)
            if p is not None and q is not None:
                expected = ((q[0] + 0.5) * sx - 0.5, (q[1] + 0.5) * sy - 0.5)
                assert math.dist(p, expected) < 1e-6


# --- photos given to generate ---------------------------------------------------------------------

def test_generate_extracts_the_people_of_a_photo_given_as_pose(tmp_path: Path, tiny_root: Path,
                                                                ) -> None:
    from loraforge.generate.extract import Detector, load_picture, photo_poses
    from loraforge.generate.scenes import PoseCache

    photo = _figures(tmp_path / "photo.jpg")
    settings = _tiny_settings(tiny_root)
    warnings: list[str] = []
    image = PoseCache(warnings.append, photo_poses(settings)).load(photo, 128, 96)
    expected = Detector(settings).people(load_picture(photo), photo)
    assert image.size == (128, 96) and looks_like_pose_map(image)[0]
    n = len(expected.people)
    assert len(warnings) == 1 and "looks like a photo" in warnings[0]
    assert f"extracted {n} people" in warnings[0]
    from loraforge.generate.poses import fit_pose

    assert np.array_equal(np.asarray(image), np.asarray(draw_pose(fit_pose(expected, 128, 96))))


def test_generate_decodes_a_huge_photo_small(tmp_path: Path, tiny_root: Path) -> None:
    """A 4096x3072 JPEG given as a pose is decoded at 1/4 scale for its colour check and its
    people (1024x768, 2.4 MB instead of 38 MB), as `pose extract` decodes it."""
    from loraforge.generate.extract import Detector
    from loraforge.generate.scenes import PoseCache

    photo = _figures(tmp_path / "huge.jpg", (4096, 3072))
    detector = Detector(_tiny_settings(tiny_root))
    sizes: list[tuple[int, int]] = []

    def people(path: Path, picture: Image.Image) -> PoseMap:
        sizes.append(picture.size)
        return detector.people(picture, path)

    image = PoseCache(lambda _: None, people).load(photo, 128, 96)
    assert sizes == [(1024, 768)]
    assert image.size == (128, 96) and looks_like_pose_map(image)[0]


def test_generate_refuses_a_photo_when_told_to(tmp_path: Path) -> None:
    from loraforge.generate.extract import photo_poses
    from loraforge.generate.scenes import PoseCache

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(60, 200, (48, 64, 3), dtype=np.uint8)).save(photo)
    settings = load_settings(None, [f"storage.root={tmp_path}",
                                    "generate.pose_from_photo=refuse"])
    assert photo_poses(settings) is None
    with pytest.raises(ForgeError, match="not a pose map") as refused:
        PoseCache(lambda _: None, photo_poses(settings)).load(photo, 128, 96)
    assert "loraforge pose extract" in str(refused.value)
    assert f"--pose {tmp_path / 'photo.pose.png'})" in str(refused.value)  # where extract puts it
    assert 'pose_from_photo = "extract"' in str(refused.value)


# --- a real photograph, seen by a real detector ---------------------------------------------------

REFERENCE_PYTHON = Path(__file__).resolve().parents[1] / "lora_env" / "reference" / "bin" / "python"
HEAD_AND_SHOULDERS = (0, 1, 2, 5, 14, 15, 16, 17)  # nose, neck, shoulders, eyes, ears


def _reference_people(count: int, picture: Path) -> list[Person]:
    """Up to ``count`` people MediaPipe's BlazePose (trained weights from its wheel, run in its own
    environment by tests/reference_pose.py) sees in ``picture``, left to right."""
    result = subprocess.run([str(REFERENCE_PYTHON), str(Path(__file__).with_name(
        "reference_pose.py")), str(count), str(picture)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    people = [Person(tuple(None if p is None else (p[0], p[1]) for p in keypoints))
              for keypoints in json.loads(result.stdout)[0]]
    return sorted(people, key=lambda person: (person[1] or (0.0, 0.0))[0])


def _published_input(picture: Image.Image) -> Image.Image:
    """The picture as the published body model takes it: fitted into 656x368 (bicubic), padded
    right and bottom with grey to multiples of 8."""
    scale = min(368 / picture.height, 656 / picture.width)
    width, height = round(picture.width * scale), round(picture.height * scale)
    canvas = Image.new("RGB", (-(-width // 8) * 8, -(-height // 8) * 8), (128, 128, 128))
    canvas.paste(picture.resize((width, height), Image.Resampling.BICUBIC), (0, 0))
    return canvas


def _seeing_network(work: Path, count: int) -> object:
    """Stands in for the body network's trained weights, which cannot be downloaded here: it reads
    its input the way the published model does (BGR, pixel / 256 - 0.5), has the reference
    detector see the people in it, and answers with the maps a perfect body network draws for
    them (``_synthetic_maps``)."""
    import torch

    class Seeing(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            bgr = (x[0].permute(1, 2, 0).numpy() + 0.5) * 256
            seen = work / "network_input.png"
            Image.fromarray(bgr[:, :, ::-1].round().clip(0, 255).astype(np.uint8)).save(seen)
            people = tuple(_reference_people(count, seen))
            fields, heatmaps = _synthetic_maps(PoseMap(x.shape[3], x.shape[2], people))
            return fields[None], heatmaps[None]

    return Seeing()


@pytest.fixture(scope="module")
def hopper() -> Path:
    """Grace Hopper's portrait, the photograph matplotlib ships (in the reference environment)."""
    if not REFERENCE_PYTHON.exists():
        pytest.skip("the reference pose detector's environment is missing: "
                    "run tests/setup_reference.sh (make test does)")
    result = subprocess.run([str(REFERENCE_PYTHON), "-c", "import matplotlib.cbook as c; "
                             "print(c.get_sample_data('grace_hopper.jpg', asfileobj=False))"],
                            capture_output=True, text=True, check=True)
    return Path(result.stdout.strip())


@pytest.mark.parametrize("count", [1, 2])
def test_a_real_photographs_people_come_out_where_a_real_detector_sees_them(
        tmp_path: Path, hopper: Path, count: int) -> None:
    """Grace Hopper's portrait, alone and beside its mirror image, a real photograph seen by a
    real trained detector: BlazePose stands in for the body network's weights, seeing the
    network's input. The photo is recognised as not a pose map; every person is found, head and
    shoulders (the hips are out of frame) and nothing BlazePose does not see; each keypoint
    comes back in the photo's pixels within 1.5 network-input pixels of where BlazePose sees it at
    the network's resolution, and within 15% of the shoulder width of where it sees it in the
    full-size photo."""
    from loraforge.generate.extract import detect, load_picture

    path = hopper
    if count == 2:
        photo = Image.open(hopper).convert("RGB")
        pair = Image.new("RGB", (2 * photo.width, photo.height))
        pair.paste(photo, (0, 0))
        pair.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (photo.width, 0))
        path = tmp_path / "pair.jpg"
        pair.save(path, quality=95)
    picture = load_picture(path)
    assert not looks_like_pose_map(picture)[0]

    found = detect(_seeing_network(tmp_path, count), picture)
    small = _published_input(picture)
    small.save(tmp_path / "published_input.png")
    near = _reference_people(count, tmp_path / "published_input.png")
    full = _reference_people(count, path)
    assert (found.width, found.height) == picture.size
    assert len(found.people) == len(near) == len(full) == count

    scale = picture.height / round(picture.height * min(368 / picture.height,
                                                          656 / picture.width))
    for got, seen_small, seen_full in zip(found.people, near, full, strict=True):
        assert set(HEAD_AND_SHOULDERS) <= set(got.present())
        assert got.present() == seen_small.present()
        assert seen_full[2] is not None and seen_full[5] is not None
        shoulders = math.dist(seen_full[2], seen_full[5])
        for p, q, r in zip(got.keypoints, seen_small.keypoints, seen_full.keypoints,
                           strict=True):
            if p is None or q is None:
                continue
            assert math.dist(p, ((q[0] + 0.5) * scale - 0.5, (q[1] + 0.5) * scale - 0.5)
                             ) <= 1.5 * scale, (p, q)
            if r is not None:
                assert math.dist(p, r) <= 0.15 * shoulders, (p, r)


# --- hands and faces ------------------------------------------------------------------------------

@pytest.mark.parametrize(("outputs", "parameters"), [(22, 36_832_324), (71, 38_425_706)])
def test_the_hand_and_face_networks_have_the_published_names_and_shapes(outputs: int,
                                                                         parameters: int) -> None:
    """Simon et al. (2017): a VGG-19 trunk to conv5_2, conv5_3_CPM to 128 features, stage 1
    (1x1 to 512, 1x1 to the heatmaps: 22 for a hand, 71 for a face), stages 2-6 on the heatmaps
    and the 128 features (five 7x7, two 1x1). 147.3 MB / 153.7 MB of float32: the sizes of the
    released hand_pose_model.pth and facenet.pth."""
    import torch

    from loraforge.models.cpm import build_network

    convs = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("conv2_1", 64, 128, 3),
             ("conv2_2", 128, 128, 3), ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3),
             ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), ("conv4_1", 256, 512, 3),
             ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3),
             ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3),
             ("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, outputs, 1)]
    for stage in range(2, 7):
        convs += [(f"Mconv1_stage{stage}", outputs + 128, 128, 7)]
        convs += [(f"Mconv{i}_stage{stage}", 128, 128, 7) for i in (2, 3, 4, 5)]
        convs += [(f"Mconv6_stage{stage}", 128, 128, 1),
                  (f"Mconv7_stage{stage}", 128, outputs, 1)]
    expected = {}
    for name, cin, cout, k in convs:
        expected[f"{name}.weight"], expected[f"{name}.bias"] = (cout, cin, k, k), (cout,)
    with torch.device("meta"):
        net = build_network(outputs)
        assert net(torch.zeros(1, 3, 368, 368)).shape == (1, outputs, 46, 46)
    state = net.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == parameters


def _arms(width: float = 60.0) -> Person:
    """A person facing the viewer with both arms hanging: shoulders, elbows, wrists, and a neck."""
    points: list[tuple[float, float] | None] = [None] * 18
    points[1] = (300.0, 100.0)
    for shoulder, elbow, wrist, x in ((2, 3, 4, 300.0 - width), (5, 6, 7, 300.0 + width)):
        points[shoulder], points[elbow], points[wrist] = (x, 110.0), (x, 170.0), (x, 230.0)
    return Person(tuple(points))


def test_a_hand_is_looked_for_past_the_wrist() -> None:
    from loraforge.generate.hands import ARMS, hand_box

    person = _arms()
    # A third of the forearm past the wrist; 1.5 x the forearm (60 px) wide.
    left, top, side = hand_box(person, ARMS[1], 600, 400) or (0, 0, 0)
    assert (left, top, side) == pytest.approx((195.0, 249.8 - 45.0, 90.0))
    # At the picture's edge the square shrinks to fit; a missing elbow or a tiny arm: no hand.
    assert hand_box(person, ARMS[1], 600, 270) == pytest.approx((195.0, 204.8, 65.2))
    no_elbow = Person(tuple(None if i == 3 else p for i, p in enumerate(person.keypoints)))
    assert hand_box(no_elbow, ARMS[1], 600, 400) is None
    tiny = person.moved(lambda p: (p[0] / 10, p[1] / 10))
    assert hand_box(tiny, ARMS[1], 600, 400) is None


def test_hand_keypoints_are_the_heatmaps_peaks() -> None:
    from loraforge.generate.hands import hand_points

    rng = np.random.default_rng(0)
    truth = rng.uniform(20, 340, (21, 2))
    ys, xs = np.mgrid[0:368, 0:368]
    maps = np.stack([np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 7.0 ** 2)) for x, y in truth])
    maps[20] *= 0.04  # under the threshold: not found
    found = hand_points(maps.astype(np.float32))
    assert found[20] is None
    for p, q in zip(found[:20], truth[:20], strict=True):
        assert p is not None and math.dist(p, q) <= 1.0


def test_hands_are_detected_inside_their_squares(tmp_path: Path, tiny_root: Path) -> None:
    """Through the tiny hand network: each hand's keypoints lie in the square it was looked for
    in, and survive the JSON and the drawing."""
    from loraforge.generate.hands import ARMS, add_hands, hand_box
    from loraforge.generate.poses import HAND_POINT_COLOR, fit_pose, write_pose_json
    from loraforge.models.cpm import load_hand_detector

    picture = Image.open(_figures(tmp_path / "ref.png", (600, 400))).convert("RGB")
    person = _arms()
    pose = add_hands(load_hand_detector(tiny_root / "tiny-detector"), picture,
                     PoseMap(600, 400, (person,)))
    hands = pose.people[0].hands
    assert all(hand is not None for hand in hands)
    for hand, arm in zip(hands, ARMS, strict=True):
        left, top, side = hand_box(person, arm, 600, 400) or (0, 0, 0)
        for p in hand or ():
            if p is not None:
                assert left - 1 <= p[0] <= left + side + 1 and top - 1 <= p[1] <= top + side + 1
    write_pose_json(tmp_path / "hands.json", pose)
    assert read_pose_json(tmp_path / "hands.json") == pose
    drawn = np.asarray(draw_pose(fit_pose(pose, 600, 400)))
    for p in hands[0] or ():
        if p is not None:
            assert tuple(drawn[round(p[1]), round(p[0])]) == HAND_POINT_COLOR


@pytest.mark.parametrize("part", ["hand", "face"])
def test_hands_and_faces_need_their_detectors(tmp_path: Path, tiny_root: Path, part: str,
                                              ) -> None:
    import shutil

    from loraforge.generate.extract import extract_command

    folder = tmp_path / "body-only"
    shutil.copytree(tiny_root / "tiny-detector", folder)
    name = {"hand": "hand_pose_model", "face": "facenet"}[part]
    (folder / f"{name}.safetensors").unlink()
    settings = load_settings(None, [f"storage.root={tmp_path}", f"models.detector={folder}"])
    picture = _figures(tmp_path / "ref.png")
    with pytest.raises(ForgeError, match=f"no {part} detector here") as missing:
        extract_command(settings, [picture], None, None, None, lambda _: None,
                        hands=part == "hand", face=part == "face")
    assert "models fetch openpose-detector" in str(missing.value)
    assert not (tmp_path / "ref.pose.png").exists()


def test_a_face_is_looked_for_around_the_nose() -> None:
    from loraforge.generate.faces import face_box

    points: list[tuple[float, float] | None] = [None] * 18
    points[0], points[14], points[16] = (300.0, 100.0), (290.0, 95.0), (280.0, 104.0)
    person = Person(tuple(points))
    # 3 x the nose-eye distance (10 px along x) beats 1.5 x the nose-ear one (20 px): 30 px.
    assert face_box(person, 600, 400) == pytest.approx((270.0, 70.0, 60.0))
    assert face_box(person, 600, 120) == pytest.approx((270.0, 70.0, 50.0))  # clipped
    no_eyes = Person(tuple(p if i == 0 else None for i, p in enumerate(points)))
    assert face_box(no_eyes, 600, 400) is None


def test_faces_are_detected_inside_their_squares(tmp_path: Path, tiny_root: Path) -> None:
    from loraforge.generate.faces import add_faces, face_box
    from loraforge.generate.poses import FACE_POINT_COLOR, write_pose_json
    from loraforge.models.cpm import load_face_detector

    picture = Image.open(_figures(tmp_path / "ref.png", (600, 400))).convert("RGB")
    points: list[tuple[float, float] | None] = [None] * 18
    points[0], points[14], points[15] = (150.0, 75.0), (140.0, 68.0), (160.0, 68.0)
    person = Person(tuple(points))
    pose = add_faces(load_face_detector(tiny_root / "tiny-detector"), picture,
                     PoseMap(600, 400, (person,)))
    face = pose.people[0].face
    assert face is not None and len(face) == 70
    left, top, side = face_box(person, 600, 400) or (0, 0, 0)
    for p in face:
        if p is not None:
            assert left - 1 <= p[0] <= left + side + 1 and top - 1 <= p[1] <= top + side + 1
    write_pose_json(tmp_path / "face.json", pose)
    assert read_pose_json(tmp_path / "face.json") == pose
    drawn = np.asarray(draw_pose(pose))
    last = [p for p in face if p is not None][-1]
    assert tuple(drawn[round(last[1]), round(last[0])]) == FACE_POINT_COLOR
