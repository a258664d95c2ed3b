"""OpenPose pose maps: exact format, JSON exchange, random figures' validity, CLI behaviour."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image, ImageDraw

from loraforge.errors import ForgeError
from loraforge.generate.poses import (
    COLORS,
    L_ELBOW,
    L_SHOULDER,
    LIMB_COLORS,
    LIMBS,
    NUM_KEYPOINTS,
    R_ELBOW,
    R_SHOULDER,
    R_WRIST,
    Person,
    PoseMap,
    draw_pose,
    fit_pose,
    letterbox,
    looks_like_pose_map,
    max_figures,
    parse_size,
    random_pose,
    random_pose_command,
    read_pose_json,
    render_pose_command,
    stroke_radius,
    validate_pose,
    write_pose_json,
)

# A front-facing person on a 1024x1024 canvas, spread out so that every limb's midpoint is clear
# of the other limbs and of the keypoint circles (radius 8 px at this size).
KNOWN = (
    (512, 200), (512, 330), (392, 340), (330, 480), (300, 620), (632, 340), (694, 480),
    (724, 620), (440, 600), (420, 760), (410, 920), (584, 600), (604, 760), (614, 920),
    (480, 170), (544, 170), (440, 190), (584, 190),
)


def _known(missing: int | None = None) -> PoseMap:
    points = [None if i == missing else (float(x), float(y)) for i, (x, y) in enumerate(KNOWN)]
    return PoseMap(1024, 1024, (Person(tuple(points)),))


def _pixel(image: Image.Image, xy: tuple[float, float]) -> tuple[int, int, int]:
    return image.getpixel((round(xy[0]), round(xy[1])))  # type: ignore[return-value]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- the drawn format -------------------------------------------------------------------------

def test_colours_and_limb_order_are_exact() -> None:
    image = draw_pose(_known())
    assert image.mode == "RGB" and image.size == (1024, 1024)
    for i, xy in enumerate(KNOWN):
        assert _pixel(image, xy) == COLORS[i], f"keypoint {i}"
    for i, (a, b) in enumerate(LIMBS):
        mid = ((KNOWN[a][0] + KNOWN[b][0]) / 2, (KNOWN[a][1] + KNOWN[b][1]) / 2)
        assert _pixel(image, mid) == LIMB_COLORS[i], f"limb {i}"
        assert LIMB_COLORS[i] == tuple(round(c * 0.6) for c in COLORS[i])
    for corner in ((0, 0), (1023, 0), (0, 1023), (1023, 1023), (512, 60), (150, 500)):
        assert image.getpixel(corner) == (0, 0, 0)
    # Only the palette (full and 60%) and black appear: no anti-aliasing blends.
    colours = {c for _, c in image.getcolors(maxcolors=4096)}  # type: ignore[union-attr]
    assert colours <= {(0, 0, 0), *COLORS, *LIMB_COLORS}


def test_missing_keypoint_draws_neither_point_nor_its_limbs() -> None:
    full = draw_pose(_known())
    image = draw_pose(_known(missing=R_ELBOW))
    assert _pixel(image, KNOWN[R_ELBOW]) == (0, 0, 0)
    for a, b in ((R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST)):
        mid = ((KNOWN[a][0] + KNOWN[b][0]) / 2, (KNOWN[a][1] + KNOWN[b][1]) / 2)
        assert _pixel(image, mid) == (0, 0, 0)
    assert _pixel(image, KNOWN[R_WRIST]) == COLORS[R_WRIST]
    assert _pixel(image, KNOWN[L_ELBOW]) == COLORS[L_ELBOW]
    # Nothing changes away from the right arm.
    diff = np.any(np.asarray(full) != np.asarray(image), axis=2)
    ys, xs = np.nonzero(diff)
    arm = [KNOWN[i] for i in (R_SHOULDER, R_ELBOW, R_WRIST)]
    assert min(x for x, _ in arm) - 9 <= xs.min() and xs.max() <= max(x for x, _ in arm) + 9
    assert min(y for _, y in arm) - 9 <= ys.min() and ys.max() <= max(y for _, y in arm) + 9


def test_strokes_scale_with_image_size() -> None:
    def width_at_mid(size: int) -> int:
        s = size / 512
        pose = PoseMap(size, size, (Person(tuple(
            (100 * s, 100 * s) if i == L_SHOULDER else (100 * s, 400 * s) if i == L_ELBOW
            else None for i in range(NUM_KEYPOINTS))),))
        row = np.asarray(draw_pose(pose))[round(250 * s)]
        return int(np.any(row > 0, axis=1).sum())

    small, large = width_at_mid(512), width_at_mid(1024)
    assert stroke_radius(512, 512) == 4.0 and stroke_radius(1024, 1024) == 8.0
    assert stroke_radius(1024, 768) == 6.0  # scale = shortest side / 512
    assert 7 <= small <= 10
    assert large > small and abs(large - 2 * small) <= 2


# --- JSON exchange ----------------------------------------------------------------------------

def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    poses = [random_pose(n, 1024, 768, seed) for seed in range(10) for n in (1, 2, 3)]
    poses += [_known(missing=R_ELBOW), PoseMap(640, 480, ()),
              PoseMap(300, 200, (Person(((100 + 0.1 + 0.2, 100 / 3),) + (None,) * 17),))]
    for k, pose in enumerate(poses):
        path = tmp_path / f"p{k}.json"
        write_pose_json(path, pose)
        back = read_pose_json(path)
        assert back == pose
        assert draw_pose(back).tobytes() == draw_pose(pose).tobytes()
        assert PoseMap.from_dict(json.loads(path.read_text())) == pose
    data = json.loads((tmp_path / "p0.json").read_text())
    assert set(data) == {"canvas_width", "canvas_height", "people"}
    values = data["people"][0]["pose_keypoints_2d"]
    assert len(values) == 54 and values[2::3] == [1.0] * 18
    missing = _known(missing=R_ELBOW).to_dict()["people"][0]["pose_keypoints_2d"]
    assert missing[3 * R_ELBOW:3 * R_ELBOW + 3] == [0.0, 0.0, 0.0]


def test_json_from_editors_is_accepted() -> None:
    flat = [v for x, y in KNOWN for v in (x, y, 0.87)]
    flat[3 * R_ELBOW + 2] = 0  # c = 0: missing, whatever x and y say
    text = json.dumps({"version": 1.3, "canvas_width": 1024, "canvas_height": 1024.0,
                       "people": [{"pose_keypoints_2d": flat, "face_keypoints_2d": []}]})
    pose = PoseMap.from_json(text)
    assert pose == _known(missing=R_ELBOW)
    assert PoseMap.from_json(f"[{text}]") == pose  # ComfyUI's list of frames, one frame


def test_json_with_normalised_keypoints_is_scaled_to_its_canvas() -> None:
    """A1111's ControlNet extension and ComfyUI's pose nodes write keypoints in 0..1 beside a
    canvas in pixels (and null for hands they did not detect). Drawn as pixels, the pose was a
    dot in the corner: `generate --pose` rendered an unposed scene without a word."""
    flat = [v for x, y in KNOWN for v in (x / 1024, y / 1024, 1.0)]
    text = json.dumps({"canvas_width": 1024, "canvas_height": 1024, "people": [
        {"pose_keypoints_2d": flat, "hand_left_keypoints_2d": None, "face_keypoints_2d": None}]})
    assert PoseMap.from_json(text) == _known()
    assert PoseMap.from_json(f"[{text}]") == _known()
    wide = PoseMap.from_json(text.replace('"canvas_width": 1024', '"canvas_width": 2048'))
    assert wide.people[0].keypoints[0] == (KNOWN[0][0] * 2, KNOWN[0][1])
    leaving = [*flat[:-3], 1.02, *flat[-2:]]  # the last keypoint a little past the right edge
    edge = PoseMap.from_json(text.replace(json.dumps(flat), json.dumps(leaving)))
    assert edge.people[0].keypoints[-1] == (1.02 * 1024, KNOWN[-1][1])
    # an ankle dragged well below the frame in a pose editor: the whole pose was read as
    # pixels, every figure a dot in the corner, rendered without a word
    dragged = [*flat[:-2], 1.25, flat[-1]]
    below = PoseMap.from_json(text.replace(json.dumps(flat), json.dumps(dragged)))
    assert below.people[0].keypoints[0] == _known().people[0].keypoints[0]
    assert below.people[0].keypoints[-1] == (KNOWN[-1][0], 1.25 * 1024)


def _people(values: object) -> str:
    return json.dumps({"canvas_width": 64, "canvas_height": 64,
                       "people": [{"pose_keypoints_2d": values}]})


@pytest.mark.parametrize(("text", "needle"), [
    ("{", "is not valid JSON"),
    ("[1, 2]", "list of 2 poses"),
    ('"pose"', "not an OpenPose pose object"),
    ('{"people": []}', "has no canvas_width"),
    ('{"canvas_width": 0, "canvas_height": 64, "people": []}', "canvas_width must be"),
    ('{"canvas_width": 64.5, "canvas_height": 64, "people": []}', "canvas_width must be"),
    ('{"canvas_width": 64, "canvas_height": true, "people": []}', "canvas_height must be"),
    ('{"canvas_width": 64, "canvas_height": 64}', 'no "people" list'),
    ('{"canvas_width": 64, "canvas_height": 64, "people": {}}', '"people" must be a list'),
    ('{"canvas_width": 64, "canvas_height": 64, "people": [{}]}', "has no pose_keypoints_2d"),
    (_people([1.0] * 53), "has 53 numbers; expected 54"),
    (_people([1.0] * 75), "BODY_25"),
    (_people(None), "must be a list of numbers"),
    (_people([1.0] * 53 + ["1"]), "pose_keypoints_2d[53] (left_ear c) must be a finite number"),
    (_people([1.0] * 30 + [float("nan")] + [1.0] * 23), "[30] (right_ankle x)"),
    (_people([1.0] * 5 + [float("inf")] + [1.0] * 48), "must be a finite number"),
    (_people([1.0] * 53 + [10**400]), "must be a finite number"),
    (_people([1.0] * 3 + [1e300] + [1.0] * 50), "(neck x) is 1e+300 px, beyond any canvas"),
    ('{"canvas_width": 1' + "0" * 400 + ', "canvas_height": 64, "people": []}', "canvas_width"),
])
def test_malformed_json_names_file_and_problem(text: str, needle: str) -> None:
    with pytest.raises(ForgeError) as err:
        PoseMap.from_json(text, "poses/p.json")
    assert needle in str(err.value)
    assert str(err.value).startswith("poses/p.json: ")


def test_unreadable_json_files(tmp_path: Path) -> None:
    for path, needle in ((tmp_path / "nope.json", "no such file"), (tmp_path, "is a folder")):
        with pytest.raises(ForgeError, match=needle):
            read_pose_json(path)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00\x89PNG")
    with pytest.raises(ForgeError, match="not a text"):
        read_pose_json(binary)


# --- random figures ---------------------------------------------------------------------------

def test_random_poses_pass_every_rule_and_are_deterministic() -> None:
    seen: set[PoseMap] = set()
    for seed in range(500):
        for figures in (1, 2, 3):
            pose = random_pose(figures, 1024, 768, seed)
            assert (pose.width, pose.height, len(pose.people)) == (1024, 768, figures)
            assert validate_pose(pose) == [], (seed, figures)
            assert all(p.is_complete() for p in pose.people)
            assert all(p[R_SHOULDER][0] < p[L_SHOULDER][0] for p in pose.people)  # type: ignore[index]
            assert random_pose(figures, 1024, 768, seed) == pose
            seen.add(pose)
    assert len(seen) == 1500  # different seeds (and counts) give different poses


@pytest.mark.parametrize(("width", "height"), [(512, 512), (768, 1024), (256, 256), (2048, 512),
                                               (96, 96), (300, 1000), (1920, 1080)])
def test_random_poses_valid_at_other_sizes(width: int, height: int) -> None:
    most = max_figures(width, height)
    assert most >= 1
    for figures in sorted({1, 2, 3, most} & set(range(1, most + 1))):
        for seed in range(40):
            pose = random_pose(figures, width, height, seed)
            assert validate_pose(pose) == [], (width, height, figures, seed)


def test_same_seed_same_png_bytes() -> None:
    for seed in range(8):
        a = _png_bytes(draw_pose(random_pose(2, 1024, 768, seed)))
        b = _png_bytes(draw_pose(random_pose(2, 1024, 768, seed)))
        assert a == b
    assert _png_bytes(draw_pose(random_pose(2, 1024, 768, 1))) != a


def test_figures_use_most_of_the_height_and_stay_apart() -> None:
    pose = random_pose(3, 1024, 768, 0)
    boxes = [p.bbox(stroke_radius(1024, 768)) for p in pose.people]
    assert all(b is not None for b in boxes)
    for left, right in itertools.pairwise(boxes):
        assert left is not None and right is not None and left[2] < right[0]  # slots, in order
    heights = [b[3] - b[1] for b in boxes if b is not None]
    assert min(heights) > 0.55 * 768 and max(heights) < 768


@pytest.mark.parametrize(("figures", "size", "needle"), [
    (12, (256, 256), "at most 4 fit"),
    (5, (256, 256), "a wider --size, e.g. 320x256"),
    (1, (30, 256), "no figure fits"),
    (1, (512, 64), "at least 96 px tall"),
    (0, (512, 512), "--figures must be at least 1"),
    (-2, (512, 512), "--figures must be at least 1"),
    (1, (0, 512), "must be positive"),
])
def test_impossible_requests_are_user_errors(figures: int, size: tuple[int, int],
                                             needle: str) -> None:
    with pytest.raises(ForgeError, match=re.escape(needle)):
        random_pose(figures, size[0], size[1], 0)


def test_validate_flags_bad_poses() -> None:
    good = random_pose(2, 1024, 768, 5)
    assert validate_pose(good) == []
    a, b = good.people

    def swapped(p: Person) -> Person:
        k = list(p.keypoints)
        k[R_SHOULDER], k[L_SHOULDER] = k[L_SHOULDER], k[R_SHOULDER]
        return Person(tuple(k))

    def shifted(p: Person, dx: float, dy: float = 0.0) -> Person:
        return Person(tuple(None if q is None else (q[0] + dx, q[1] + dy) for q in p.keypoints))

    def stretched_arm(p: Person) -> Person:
        k = list(p.keypoints)
        s, w = k[R_SHOULDER], k[R_WRIST]
        assert s is not None and w is not None
        k[R_WRIST] = (s[0] + 3 * (w[0] - s[0]), s[1] + 3 * (w[1] - s[1]))
        return Person(tuple(k))

    def problems(*people: Person) -> str:
        return "\n".join(validate_pose(PoseMap(1024, 768, people)))

    assert "right/left swapped" in problems(swapped(a), b)
    assert "overlap" in problems(a, shifted(a, 20))
    assert "leaves the 1024x768 canvas" in problems(shifted(a, -a.bbox()[0]), b)  # type: ignore[index]
    assert "out of reach" in problems(stretched_arm(a), b)
    assert "expected length" in problems(stretched_arm(a), b)
    assert "missing keypoints: right_elbow" in problems(
        Person(tuple(None if i == R_ELBOW else q for i, q in enumerate(a.keypoints))), b)
    upside_down = Person(tuple(None if q is None else (q[0], 768 - q[1]) for q in a.keypoints))
    assert "torso leans" in problems(upside_down, b)
    # Lenient mode, for poses from editors: partial people are fine, swaps and units are not.
    partial = PoseMap(1024, 768, (Person((None,) * 16 + ((10.0, 10.0), (20.0, 10.0))),))
    assert validate_pose(partial, strict=False) == []
    mixed = Person(tuple((q[0], q[1]) if q is not None else None for q in swapped(a).keypoints))
    assert "right and left look swapped" in "".join(
        validate_pose(PoseMap(1024, 768, (mixed,)), strict=False))
    tiny = PoseMap(1024, 768, (Person(((0.5, 0.5),) * 18),))
    assert "normalised" in "".join(validate_pose(tiny, strict=False))


# --- sizes, letterbox, detection --------------------------------------------------------------

@pytest.mark.parametrize(("text", "size"), [("1024x768", (1024, 768)), (" 512 X 512 ", (512, 512)),
                                            ("768×1024", (768, 1024))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "needle"), [
    ("abc", "is not WIDTHxHEIGHT"), ("1024", "is not WIDTHxHEIGHT"), ("-5x100", "WIDTHxHEIGHT"),
    ("10.5x20", "WIDTHxHEIGHT"), ("0x100", "must be positive"), ("100x0", "must be positive"),
    ("99999x100", "too large"),
])
def test_parse_size_errors(text: str, needle: str) -> None:
    with pytest.raises(ForgeError, match=needle):
        parse_size(text)


def test_letterbox_keeps_aspect_and_centres() -> None:
    src = Image.new("RGB", (200, 100), (255, 0, 0))
    out = letterbox(src, 512, 512)
    assert out.size == (512, 512) and out.mode == "RGB"
    a = np.asarray(out)
    rows = np.nonzero(a[:, :, 0].any(axis=1))[0]
    cols = np.nonzero(a[:, :, 0].any(axis=0))[0]
    assert (cols.min(), cols.max()) == (0, 511)
    assert (rows.min(), rows.max()) == (128, 383)  # 512x256, centred
    tall = letterbox(Image.new("RGB", (100, 300), (0, 255, 0)), 600, 300)
    cols = np.nonzero(np.asarray(tall)[:, :, 1].any(axis=0))[0]
    assert (cols.min(), cols.max()) == (250, 349)
    assert letterbox(src, 200, 100).tobytes() == src.tobytes()


def test_fit_pose_follows_letterbox() -> None:
    pose = random_pose(2, 1024, 768, 9)
    fitted = fit_pose(pose, 512, 512)
    assert (fitted.width, fitted.height) == (512, 512)
    neck = pose.people[0].keypoints[1]
    moved = fitted.people[0].keypoints[1]
    assert neck is not None and moved is not None
    assert math.isclose(moved[0], neck[0] / 2) and math.isclose(moved[1], neck[1] / 2 + 64)


def test_looks_like_pose_map() -> None:
    ok, why = looks_like_pose_map(draw_pose(random_pose(2, 1024, 768, 0)))
    assert ok, why
    assert looks_like_pose_map(draw_pose(_known()))[0]
    resized = draw_pose(random_pose(3, 1024, 768, 4)).resize((512, 384), Image.Resampling.BILINEAR)
    assert looks_like_pose_map(resized)[0]
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    ok, why = looks_like_pose_map(noise)
    assert not ok and "looks like a photo" in why
    ramp = np.linspace(0, 255, 320)
    gradient = np.stack([np.tile(ramp, (240, 1)), np.tile(ramp[::-1], (240, 1)),
                         np.full((240, 320), 120.0)], axis=2).astype(np.uint8)
    ok, why = looks_like_pose_map(Image.fromarray(gradient))
    assert not ok and "looks like a photo" in why
    dark = (gradient // 12).astype(np.uint8)  # a dark photo: mostly black, but not the palette
    dark[100:140, 100:220] = (90, 60, 40)
    ok, why = looks_like_pose_map(Image.fromarray(dark))
    assert not ok and "not a pose map" in why
    for blank in (Image.new("RGB", (64, 64)), Image.new("RGB", (640, 480), (40, 40, 40))):
        ok, why = looks_like_pose_map(blank)
        assert not ok and why.startswith("blank")
    ok, why = looks_like_pose_map(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert not ok
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    white.paste((255, 0, 0), (10, 10, 20, 20))
    assert "white background" in looks_like_pose_map(white)[1]


# --- CLI --------------------------------------------------------------------------------------

def test_cli_random_then_render(tmp_path: Path) -> None:
    png, js, again = tmp_path / "X.png", tmp_path / "X.json", tmp_path / "Y.png"
    result = run_cli("pose", "random", "--figures", "2", "--size", "512x384", "--seed", "3",
                     "-o", png, "--pose-json", js)
    assert result.returncode == 0, result.stderr
    assert "(2 figures, 512x384, seed 3)" in " ".join(result.stdout.split())
    with Image.open(png) as im:
        assert im.size == (512, 384) and im.mode == "RGB"
        pixels = im.tobytes()
    pose = read_pose_json(js)
    assert len(pose.people) == 2 and validate_pose(pose) == []
    assert pose == random_pose(2, 512, 384, 3)
    result = run_cli("pose", "render", js, "-o", again)
    assert result.returncode == 0, result.stderr
    with Image.open(again) as im:
        assert im.tobytes() == pixels
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_bad_input_is_a_clear_error_and_keeps_files(tmp_path: Path) -> None:
    keep, keep_json = tmp_path / "keep.png", tmp_path / "keep.json"
    keep.write_bytes(b"precious")
    keep_json.write_text("precious")
    bad = tmp_path / "bad.json"
    bad.write_text(_people([1.0] * 53))
    random = ["pose", "random", "-o", keep, "--pose-json", keep_json]
    cases: list[tuple[list[str | Path], list[str]]] = [
        ([*random, "--size", "0x100"], ["0x100", "must be positive"]),
        ([*random, "--size", "abc"], ["abc", "WIDTHxHEIGHT"]),
        ([*random, "--figures", "12", "--size", "256x256"], ["at most 4 fit", "--figures 4 or"]),
        (["pose", "render", tmp_path / "missing.json", "-o", keep], ["missing.json",
                                                                       "no such file"]),
        (["pose", "render", bad, "-o", keep], ["bad.json", "53 numbers; expected 54"]),
    ]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:  # separate processes, at once
        results = list(pool.map(lambda case: run_cli(*case[0]), cases))
    for (_, needles), result in zip(cases, results, strict=True):
        assert_user_error(result, *needles)
    assert keep.read_bytes() == b"precious"
    assert keep_json.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "keep.json", "keep.png"]


@pytest.mark.parametrize(("call", "needle"), [
    (lambda d: random_pose_command(d / "keep.png", 0, "512x512", 0, None), "--figures must"),
    (lambda d: random_pose_command(d / "keep.png", 1, "512x512", -1, None), "--seed must"),
    (lambda d: random_pose_command(d / "pose.jpg", 1, "512x512", 0, None), "written as PNG"),
    (lambda d: random_pose_command(d / "keep.png", 1, "512x512", 0, d / "keep.png"),
     "same file"),
    (lambda d: random_pose_command(d, 1, "512x512", 0, None), "is a folder"),
    (lambda d: render_pose_command(d / "keep.json", d / "keep.png"), "not valid JSON"),
    (lambda d: render_pose_command(d / "keep.png", None), "overwrite the pose JSON"),
])
def test_commands_refuse_bad_input_without_writing(tmp_path: Path, call: Any,
                                                   needle: str) -> None:
    (tmp_path / "keep.png").write_bytes(b"precious")
    (tmp_path / "keep.json").write_text("precious")
    with pytest.raises(ForgeError, match=re.escape(needle)):
        call(tmp_path)
    assert (tmp_path / "keep.png").read_bytes() == b"precious"
    assert (tmp_path / "keep.json").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json", "keep.png"]


def test_render_command_defaults_to_png_beside_json(tmp_path: Path) -> None:
    pose = random_pose(1, 640, 480, 2)
    write_pose_json(tmp_path / "scene.json", pose)
    lines = render_pose_command(tmp_path / "scene.json", None)
    assert lines == [f"wrote {tmp_path / 'scene.png'} (1 person, 640x480)"]
    with Image.open(tmp_path / "scene.png") as im:
        assert im.tobytes() == draw_pose(pose).tobytes()
    (person,) = pose.people
    off = PoseMap(640, 480, (Person(((700.0, 10.0), *person.keypoints[1:])),))
    write_pose_json(tmp_path / "off.json", off)
    lines = render_pose_command(tmp_path / "off.json", tmp_path / "off.png")
    assert lines[1] == "warning: person 1: outside the canvas: nose"


@pytest.mark.parametrize(("people", "listed"), [
    ([], "no people"),
    ([{"pose_keypoints_2d": [0] * 54}], "1 person"),  # every keypoint missing
    ([{"pose_keypoints_2d": [-500, 10, 1] * 18}] * 2, "2 people")])  # off the canvas
def test_a_pose_json_that_draws_no_figure_is_refused_as_a_blank_map_is(
        tmp_path: Path, people: list[Any], listed: str) -> None:
    """It rendered an all-black pose map, and `generate --pose` an unposed scene, exit 0."""
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"canvas_width": 128, "canvas_height": 96, "people": people}))
    with pytest.raises(ForgeError) as refused:
        render_pose_command(path, None)
    assert refused.value.message == (f"draws no figure on its 128x96 canvas ({listed}; no "
                                     "keypoint with a confidence above 0 inside it)")
    assert refused.value.path == path and "loraforge pose random" in (refused.value.fix or "")
    assert not (tmp_path / "empty.png").exists()
    lone = [0.0] * 54  # one keypoint inside is a figure, however small its dot
    lone[:3] = [256, 200, 0.9]
    path.write_text(json.dumps({"canvas_width": 512, "canvas_height": 512,
                                "people": [{"pose_keypoints_2d": lone}]}))
    assert render_pose_command(path, None)[0].startswith("wrote ")


def test_narrowest_pose_fits_the_capacity_bound() -> None:
    """Narrow slots rely on "at attention" figures never being wider than ATTENTION_MAX_WIDTH."""
    from loraforge.generate import poses

    rng = np.random.default_rng(0)
    widest = 0.0
    for _ in range(3000):
        xs = [x for x, _ in poses._build_figure(rng, poses._ATTENTION)]
        widest = max(widest, max(xs) - min(xs))
    assert 0.3 < widest <= poses.ATTENTION_MAX_WIDTH


def test_hands_and_faces_in_the_exchange_json() -> None:
    """OpenPose writes [] for hands it did not look for; a hand of the wrong length is named."""
    body = [v for p in KNOWN for v in (*p, 1)]
    pose = PoseMap.from_dict({"canvas_width": 1024, "canvas_height": 1024, "people": [
        {"pose_keypoints_2d": body, "hand_left_keypoints_2d": [],
         "hand_right_keypoints_2d": [v for i in range(21) for v in (i, 2 * i, i % 2)],
         "face_keypoints_2d": [v for i in range(70) for v in (i, i, 1)]}]})
    left, right = pose.people[0].hands
    assert left is None and right is not None
    assert right[1] == (1.0, 2.0) and right[2] is None
    face = pose.people[0].face
    assert face is not None and face[69] == (69.0, 69.0)
    assert PoseMap.from_json(pose.to_json()) == pose
    with pytest.raises(ForgeError, match=r"people\[0\].hand_left_keypoints_2d must be 63"):
        PoseMap.from_dict({"canvas_width": 8, "canvas_height": 8, "people": [
            {"pose_keypoints_2d": body, "hand_left_keypoints_2d": [1, 2, 3]}]})


def test_a_pose_map_written_here_is_replaced_whatever_its_size(tmp_path: Path) -> None:
    """A map too large for Pillow's decompression guard (`pose random --size 16384x16384`)
    was refused as "not a pose map" when written again: the mark is read from its chunks."""
    big = tmp_path / "big.png"
    random_pose_command(big, 1, "256x256", 0, None)
    data = big.read_bytes()
    start = data.index(b"IHDR") + 4  # claim 16384 x 16384 (the chunk's CRC is not checked)
    big.write_bytes(data[:start] + (16384).to_bytes(4, "big") * 2 + data[start + 8:])
    random_pose_command(big, 2, "256x256", 1, None)
    assert Image.open(big).size == (256, 256)


def test_pose_outputs_replace_pose_maps_but_never_a_photo_a_config_or_other_json(
        tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(photo)
    night = tmp_path / "night.png"  # mostly black, like a map, but not in OpenPose colours
    moon = Image.new("RGB", (400, 300))
    ImageDraw.Draw(moon).ellipse((150, 100, 300, 250), fill=(240, 240, 200))
    moon.save(night)
    config, other = tmp_path / "forge.toml", tmp_path / "notes.json"
    config.write_text("[storage]\n")
    other.write_text('{"mine": 1}')
    roster = tmp_path / "roster.json"  # the user's, with a "people" key of its own
    roster.write_text('{"people": "mine"}')
    originals = {p: p.read_bytes() for p in (photo, night, config, other, roster)}

    # Given by mistake as an output, each is refused before anything is written.
    refused = run_cli("pose", "random", "-o", tmp_path / "new.png", "--pose-json", config)
    assert_user_error(refused, "forge.toml", "needs its own .json name")
    for call, needle in [
        (lambda: random_pose_command(photo, 1, "256x256", 0, None), "photo.png"),
        (lambda: random_pose_command(tmp_path / "new.png", 1, "256x256", 0, other),
         "notes.json"),
        (lambda: random_pose_command(tmp_path / "new.png", 1, "256x256", 0, roster),
         "roster.json"),
    ]:
        with pytest.raises(ForgeError, match="exists and is not") as error:
            call()
        assert needle in str(error.value.path)
    assert not (tmp_path / "new.png").exists()

    # A pose map written here (marked) is replaced; one from a pose editor (no mark) is not.
    pose_json = tmp_path / "pose.json"
    random_pose_command(tmp_path / "new.png", 1, "256x256", 0, pose_json)
    random_pose_command(tmp_path / "new.png", 2, "256x256", 1, pose_json)
    assert len(read_pose_json(pose_json).people) == 2
    editor = tmp_path / "editor.png"
    draw_pose(random_pose(1, 256, 256, 5)).save(editor)
    originals[editor] = editor.read_bytes()
    for picture in (photo, night, editor):
        with pytest.raises(ForgeError, match="exists and is not a pose map that loraforge"):
            render_pose_command(pose_json, picture)
    assert {p: p.read_bytes() for p in originals} == originals


def _neon_logo(path: Path) -> Path:
    """A user's logo: black background, saturated strokes in OpenPose-like colours."""
    logo = Image.new("RGB", (300, 200))
    draw = ImageDraw.Draw(logo)
    draw.rectangle((10, 10, 290, 190), outline=(0, 255, 255), width=4)
    draw.line((20, 150, 280, 150), fill=(255, 255, 0), width=6)
    draw.ellipse((120, 50, 180, 110), fill=(255, 0, 255))
    logo.save(path)
    return path


def test_a_dark_colourful_png_of_the_users_is_never_taken_for_a_pose_map(tmp_path: Path,
                                                                          ) -> None:
    """`pose random -o neon_logo.png` replaced the user's logo, exit 0: its colours passed for
    a pose map's. Only a PNG marked as loraforge's pose map is replaced, by every pose command."""
    from loraforge.config import load_settings
    from loraforge.generate.extract import extract_command

    logo = _neon_logo(tmp_path / "neon_logo.png")
    original = logo.read_bytes()
    pose_json = tmp_path / "pose.json"
    write_pose_json(pose_json, random_pose(1, 256, 256, 0))
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (90, 120, 150)).save(photo)
    settings = load_settings(None, [f"storage.root={tmp_path / 'store'}"])
    refused = run_cli("pose", "random", "-o", logo)
    assert_user_error(refused, "neon_logo.png: exists and is not a pose map that loraforge "
                      "wrote", "another output name (-o), or remove that file first")
    for call in (lambda: render_pose_command(pose_json, logo),
                 lambda: extract_command(settings, [photo], logo, tmp_path / "p.json", None,
                                         lambda _: None)):
        with pytest.raises(ForgeError, match="exists and is not a pose map") as error:
            call()
        assert error.value.path == logo
    assert logo.read_bytes() == original


def test_pose_random_and_render_write_with_storage_file_mode(tmp_path: Path) -> None:
    """A lab's shared project sets storage.file_mode = "0664"; pose maps and JSON were written
    0644 whatever it said, so the group could not replace them."""
    (tmp_path / "forge.toml").write_text('[storage]\nfile_mode = "0664"\n')
    made = run_cli("pose", "random", "-o", "map.png", "--pose-json", "map.json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    drawn = run_cli("pose", "render", "map.json", "-o", "again.png", "--set",
                    "storage.file_mode=0660", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    modes = {name: (tmp_path / name).stat().st_mode & 0o777
             for name in ("map.png", "map.json", "again.png")}
    assert modes == {"map.png": 0o664, "map.json": 0o664, "again.png": 0o660}
