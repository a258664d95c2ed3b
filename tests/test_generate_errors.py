"""`loraforge generate` with bad input: exit 1, one message naming the file/scene and the fix, no
traceback, nothing rendered and nothing already on disk touched. Every case fails before a model
is loaded, so each run takes about a second."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from safetensors.numpy import save_file

KEEP = b"an earlier image"


@pytest.fixture()
def project(tmp_path: Path, tiny_store: Path) -> Path:
    """A project rendering at 128x96 with the tiny model, and an earlier image on disk."""
    lines = ["[storage]", 'root = "store"', "[models]",
             f'base = "{tiny_store / "tiny-sd15"}"',
             f'controlnet = "{tiny_store / "tiny-controlnet"}"',
             "[generate]", "width = 128", "height = 96", "steps = 2"]
    (tmp_path / "forge.toml").write_text("\n".join(lines) + "\n")
    images = tmp_path / "store" / "Final_Images"
    images.mkdir(parents=True)
    (images / "earlier-1.png").write_bytes(KEEP)
    return tmp_path


def _generate(project: Path, *args: str | Path) -> object:
    return run_cli("generate", "--config", project / "forge.toml", *args, cwd=project)


def _untouched(project: Path) -> None:
    images = project / "store" / "Final_Images"
    assert sorted(p.name for p in images.iterdir()) == ["earlier-1.png"]
    assert (images / "earlier-1.png").read_bytes() == KEEP


def _lora(path: Path, keys: dict[str, tuple[int, ...]], meta: dict[str, str] | None = None,
          ) -> Path:
    save_file({k: np.zeros(shape, dtype=np.float32) for k, shape in keys.items()}, str(path),
              metadata=meta or {"ss_base_model_version": "sd_v1"})
    return path


def test_missing_lora(project: Path) -> None:
    result = _generate(project, "--lora", "nowhere/blake.safetensors:0.8")
    assert_user_error(result, "nowhere/blake.safetensors", "LoRA file not found", "fix:")
    _untouched(project)


@pytest.mark.parametrize(("suffix", "needle"), [(":abc", "weight `abc`"),
                                                (":1:2", "weight `1:2`"),
                                                (":1e9", "from -5 to 5"),
                                                (":nan", "weight `nan`"),
                                                (":-7", "from -5 to 5")])
def test_bad_lora_weight_is_named_not_the_file(project: Path, suffix: str, needle: str) -> None:
    lora = _lora(project / "mine.safetensors", {"lora_unet_x.lora_down.weight": (4, 8),
                                                "lora_unet_x.lora_up.weight": (8, 4)})
    result = _generate(project, "--lora", f"{lora}{suffix}")
    assert_user_error(result, "--lora", needle, "0.8")
    assert "not found" not in result.stdout + result.stderr
    _untouched(project)


def test_none_beside_a_lora_is_a_contradiction_not_ignored(project: Path) -> None:
    """`--lora none --lora FILE` rendered with the LoRA, as if `none` had not been said."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _lora(project / "mine.safetensors", {f"{name}.lora_down.weight": (4, 32),
                                         f"{name}.lora_up.weight": (32, 4)})
    result = _generate(project, "--lora", "none", "--lora", "mine.safetensors")
    assert_user_error(result, "--lora", "names `none` (the base model alone) and LoRAs too",
                      "give it alone")
    _untouched(project)


def test_text_file_as_lora(project: Path) -> None:
    (project / "notes.safetensors").write_text("this is not a LoRA\n")
    result = _generate(project, "--lora", "notes.safetensors")
    assert_user_error(result, "notes.safetensors", "is not a safetensors file")
    _untouched(project)


@pytest.mark.parametrize("name", ["old.pt", "old.ckpt"])
def test_pickled_lora_is_refused_unopened(project: Path, name: str) -> None:
    marker = project / "unpickled"
    if name.endswith(".pt"):
        # Unpickling this would create the marker file: it must never happen.
        payload = pickle.dumps(_Trap(str(marker)), protocol=4)
    else:
        payload = b"PK\x03\x04" + b"\0" * 64  # torch's zip checkpoint format
    (project / name).write_bytes(payload)
    result = _generate(project, "--lora", name)
    assert_user_error(result, name, "pickled", "safetensors")
    assert not marker.exists()
    _untouched(project)


class _Trap:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "unpickled!"))


def test_sdxl_lora_is_refused(project: Path) -> None:
    _lora(project / "xl.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1280),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
    }, {"ss_base_model_version": "sdxl_base_v1-0"})
    result = _generate(project, "--lora", "xl.safetensors")
    assert_user_error(result, "xl.safetensors", "SDXL")
    weighted = _generate(project, "--lora", "xl.safetensors:0.8")  # not "0.8 is not a number"
    assert_user_error(weighted, "xl.safetensors", "SDXL")
    assert "not a number" not in weighted.stderr
    _untouched(project)


def test_lycoris_and_ldm_named_files_are_named_for_their_format(project: Path) -> None:
    """A LoHa (Civitai has many) failed after the models loaded, as an internal error of the
    loader with the advice to use an SD 1.x LoRA, which it was."""
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _lora(project / "loha.safetensors", {f"{module}.hada_w1_a": (320, 4),
                                         f"{module}.hada_w1_b": (4, 768),
                                         f"{module}.hada_w2_a": (320, 4),
                                         f"{module}.hada_w2_b": (4, 768), f"{module}.alpha": ()})
    result = _generate(project, "--lora", "loha.safetensors:0.7")
    assert_user_error(result, "loha.safetensors", "is a LoHa (LyCORIS) file, not a LoRA",
                      "kohya's or diffusers' LoRA format")
    ldm = "lora_unet_input_blocks_1_1_proj_in"
    _lora(project / "ldm.safetensors", {f"{ldm}.lora_down.weight": (4, 320),
                                        f"{ldm}.lora_up.weight": (320, 4)})
    result = _generate(project, "--lora", "ldm.safetensors")
    assert_user_error(result, "ldm.safetensors", "the original (LDM) way", "down_blocks_")
    _untouched(project)


def test_lora_for_a_wider_model_is_refused(project: Path) -> None:
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    _lora(project / "sd15.safetensors", {f"{name}.lora_down.weight": (4, 768),
                                         f"{name}.lora_up.weight": (320, 4),
                                         f"{name}.alpha": ()})
    result = _generate(project, "--lora", "sd15.safetensors")
    assert_user_error(result, "sd15.safetensors", "text width 768", "base model has 32")
    _untouched(project)


def test_lora_with_nan_weights_is_refused(project: Path) -> None:
    """A diverged training's LoRA would render black images (exit 0 before)."""
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    path = project / "diverged.safetensors"
    save_file({f"{name}.lora_down.weight": np.full((4, 32), np.nan, dtype=np.float32),
               f"{name}.lora_up.weight": np.zeros((32, 4), dtype=np.float32)}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    result = _generate(project, "--lora", "diverged.safetensors")
    assert_user_error(result, "diverged.safetensors", "NaN or infinite weights (1 of 2",
                      "earlier epoch")
    _untouched(project)


def test_a_lora_missing_half_of_a_module_is_named_with_the_module(project: Path) -> None:
    """It ended in a bare key name from deep in the loader ("could not be applied: 'lora_...'")."""
    kept = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    cut = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    _lora(project / "cut.safetensors", {f"{kept}.lora_down.weight": (4, 32),
                                        f"{kept}.lora_up.weight": (32, 4),
                                        f"{cut}.lora_down.weight": (4, 32)})
    result = _generate(project, "--lora", "cut.safetensors")
    assert_user_error(result, "cut.safetensors", f"is incomplete: module {cut} has its "
                      "lora_down.weight but no lora_up.weight", "cut short")
    _untouched(project)


def test_a_scene_name_that_is_a_path_is_refused(project: Path) -> None:
    """`--name ../x` quietly wrote Final_Images/x-<seed>.png."""
    result = _generate(project, "--name", "../elsewhere/x", "--lora", "none")
    assert_user_error(result, "--name", "'../elsewhere/x' is a path", "Final_Images",
                      "without /")
    _untouched(project)


def test_unreadable_pose_map(project: Path) -> None:
    (project / "pose.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    result = _generate(project, "--pose", "pose.png", "--lora", "none")
    assert_user_error(result, "pose.png", "--pose", "corrupt")
    _untouched(project)


def test_a_text_file_as_pose_map_is_not_sent_to_the_dataset(project: Path) -> None:
    (project / "pose.png").write_text("not a picture\n")
    result = _generate(project, "--pose", "pose.png", "--lora", "none")
    assert_user_error(result, "pose.png", "is not an image", "give a picture file")
    _untouched(project)


def test_a_folder_as_pose_map(project: Path) -> None:
    (project / "poses").mkdir()
    result = _generate(project, "--pose", "poses", "--lora", "none")
    assert_user_error(result, "poses", "--pose", "is a folder, not an image")
    assert "delete" not in result.stdout + result.stderr
    _untouched(project)


def test_blank_pose_map(project: Path) -> None:
    from PIL import Image

    Image.new("RGB", (128, 96)).save(project / "pose_map.png")  # generate.pose_map's default
    result = _generate(project, "--lora", "none")
    assert_user_error(result, "pose_map.png", "generate.pose_map", "blank", "--pose random")
    _untouched(project)


def test_a_folder_where_the_newest_image_is_copied_is_named_before_rendering(
        project: Path) -> None:
    """It was blamed on a full disk, after the scene's own files had been written."""
    newest = project / "store" / "Final_Images" / "final_command_scene.png"
    newest.mkdir()
    result = _generate(project, "--lora", "none")
    assert_user_error(result, "Final_Images/final_command_scene.png: is a folder",
                      "copy of the newest image", "move it away")
    assert "disk" not in result.stderr
    newest.rmdir()
    _untouched(project)  # nothing rendered, nothing written


def test_a_pose_json_with_no_figure_on_its_canvas(project: Path) -> None:
    """It rendered with an all-black pose map, exit 0: an unposed scene passed as posed."""
    (project / "empty.json").write_text(
        '{"canvas_width": 128, "canvas_height": 96, "people": []}')
    result = _generate(project, "--pose", "empty.json", "--lora", "none")
    assert_user_error(result, "empty.json", "draws no figure on its 128x96 canvas (no people",
                      "--pose random")
    _untouched(project)


def test_a_photo_as_pose_needs_the_detector_or_is_refused(project: Path) -> None:
    """A photo is extracted (generate.pose_from_photo = "extract", the default): without a
    fetched detector that says how to get one; with "refuse" it says how to extract it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 200, (48, 64, 3), dtype=np.uint8)).save(project / "me.png")
    result = _generate(project, "--pose", "me.png", "--lora", "none")
    assert_user_error(result, "--pose", "pose detector not found",
                      "loraforge models fetch openpose-detector")
    result = _generate(project, "--pose", "me.png", "--lora", "none",
                       "--set", "generate.pose_from_photo=refuse")
    assert_user_error(result, "me.png", "not a pose map", "loraforge pose extract")
    _untouched(project)


@pytest.mark.parametrize(("size", "needle"), [("12x", "is not WIDTHxHEIGHT"),
                                              ("0x96", "must be positive"),
                                              ("-5x96", "is not WIDTHxHEIGHT"),
                                              ("8x8", "out of range"),
                                              ("100000x100000", "at most 4096 px a side")])
def test_bad_size(project: Path, size: str, needle: str) -> None:
    result = _generate(project, "--size", size, "--lora", "none")
    assert_user_error(result, "--size", needle, "768x576")
    _untouched(project)


@pytest.mark.parametrize("value", ["0", "65", "four"])
def test_bad_batch_size(project: Path, value: str) -> None:
    result = _generate(project, "--batch-size", value, "--lora", "none")
    assert_user_error(result, "error: ", "--batch-size", "fix: usage: loraforge generate")
    _untouched(project)


def test_more_figures_than_fit(project: Path) -> None:
    result = _generate(project, "--pose", "random", "--figures", "9", "--lora", "none")
    assert_user_error(result, "--figures", "9 figures do not fit", "at most 3")
    _untouched(project)


def test_a_figure_count_beside_a_pose_file_of_other_figures_is_refused(project: Path) -> None:
    """`--figures 3` beside a pose of 2 people rendered the 2, and recorded 3, without a word;
    so did a scene's `figures` beside a drawn pose map."""
    from loraforge.generate.poses import random_pose_command

    random_pose_command(project / "two.png", 2, "128x96", 0, project / "two.json")
    result = _generate(project, "--pose", "two.json", "--figures", "3", "--lora", "none")
    assert_user_error(result, "--figures: asks for 3 figures, but the pose",
                      "two.json has 2; a figure count only counts the people of a random pose",
                      "fix: leave --figures out", "or pick a pose of 3 figures (or --pose random)")
    (project / "scenes.toml").write_text('[[scene]]\nname = "one"\npose = "two.png"\n'
                                         "figures = 1\n")
    result = _generate(project, "--scenes", "scenes.toml", "--lora", "none")
    assert_user_error(result, 'scene "one" (#1), field `figures`: asks for 1 figure, but the '
                      "pose", "two.png has 2", "fix: leave `figures` out",
                      'pick a pose of 1 figure (or pose = "random")')
    _untouched(project)


def test_figures_beside_a_scenes_file_counts_random_poses_only(project: Path,
                                                                tiny_store: Path) -> None:
    """`--figures 2` beside a scenes file is the count of its random poses: a scene with a pose
    file of 3 people was refused. An image's record names a figure count only for a random
    pose, so pasted into a scenes file (as the --from refusal advises) it is not refused."""
    from loraforge.config import load_settings
    from loraforge.generate.loras import BaseWidths
    from loraforge.generate.poses import random_pose_command
    from loraforge.generate.run import scene_table
    from loraforge.generate.scenes import LoraResolver, Options, PoseCache, plan_jobs

    random_pose_command(project / "three.png", 3, "128x96", 0, None)
    (project / "scenes.toml").write_text('[[scene]]\nname = "posed"\npose = "three.png"\n'
                                         '[[scene]]\nname = "free"\n')
    settings = load_settings(project / "forge.toml")
    resolver = LoraResolver(settings, BaseWidths.of(tiny_store / "tiny-sd15"))
    posed, free = plan_jobs(settings, Options(scenes=project / "scenes.toml", figures=2,
                                              loras=["none"]), resolver, PoseCache(print, None))
    assert "figures" not in scene_table(posed, [1])["scene"]
    assert scene_table(free, [1])["scene"]["figures"] == 2


def test_unknown_sampler_lists_the_known_ones(project: Path) -> None:
    result = _generate(project, "--sampler", "DPM++ 3M Turbo", "--lora", "none")
    assert_user_error(result, "--sampler", "unknown sampler", "DPM++ 2M Karras", "Euler a",
                      "DDIM", "UniPC", "DPM++ SDE Karras")
    _untouched(project)


def test_bad_scene_entries_are_named_and_nothing_is_rendered(project: Path) -> None:
    (project / "scenes.toml").write_text(
        '[[scene]]\nname = "good"\nprompt = "fine"\n\n'
        '[[scene]]\nname = "two"\nprompt = "x"\nsize = "abc"\n\n'
        '[[scene]]\nname = "three"\nprompt = "y"\nstepz = 3\n\n'
        '[[scene]]\nname = "four"\nprompt = "z"\nseeds = [1, 1]\n')
    result = _generate(project, "--scenes", "scenes.toml", "--lora", "none")
    assert_user_error(result, "scenes.toml", "3 bad scene entries", "nothing was rendered",
                      'scene "two" (#2), field `size`', 'scene "three" (#3): unknown field '
                      "`stepz` (did you mean `steps`?)", 'scene "four" (#4), field `seeds`')
    assert '"good"' not in result.stdout + result.stderr
    _untouched(project)


def test_scene_mistakes_are_named_where_they_are(project: Path) -> None:
    """A duplicate name is numbered by its place in the file (a bad scene before it counts); a
    figure count written as text says so; a background weight out of range is refused with
    or without figures; a cast written [[scene.figures]] is named as one. Names in other
    scripts keep their own files; "café" typed two ways is one name."""
    (project / "scenes.toml").write_text(
        '[[scene]]\nname = "bad"\nsize = "abc"\n\n'
        '[[scene]]\nname = "hero"\n\n'
        '[[scene]]\nname = "Hero"\n\n'
        '[[scene]]\nname = "cast"\npose = "random"\nfigures = "2"\n'
        '[[scene.figure]]\nprompt = "a"\n[[scene.figure]]\nprompt = "b"\n\n'
        '[[scene]]\nname = "heavy"\nbackground_weight = 7\n\n'
        '[[scene]]\nname = "plural"\npose = "random"\n'
        '[[scene.figures]]\nprompt = "a"\n[[scene.figures]]\nprompt = "b"\n\n'
        '[[scene]]\nname = "市場"\n\n[[scene]]\nname = "公園"\n\n'
        '[[scene]]\nname = "café"\n\n[[scene]]\nname = "cafe\u0301"\n', encoding="utf-8")
    result = _generate(project, "--scenes", "scenes.toml", "--lora", "none")
    assert_user_error(result, "6 bad scene entries", 'scenes "hero" and "Hero" (#3)',
                      'scene "cast" (#4), field `figures`: must be a whole number',
                      'scene "heavy" (#5), field `background_weight`: must be from 0 to 1',
                      'scene "plural" (#6), field `figures`: is the number of people in a '
                      "random pose map (figures = 2), but holds 2 tables: a cast is written "
                      "[[scene.figure]]", "rename each [[scene.figures]] to [[scene.figure]]",
                      'scenes "café" and "cafe\u0301" (#10) would write the same files '
                      "(café-<seed>.png)")
    assert "市場" not in result.stdout + result.stderr
    _untouched(project)


def test_a_count_beside_seeds_is_refused(project: Path) -> None:
    """A scene's `count` beside its `seeds` was ignored: 2 images of the 5 asked for, exit 0
    (`seed` beside `seeds` was refused)."""
    (project / "scenes.toml").write_text('[[scene]]\nname = "a"\nseeds = [1, 2]\ncount = 5\n')
    result = _generate(project, "--scenes", "scenes.toml", "--lora", "none")
    assert_user_error(result, "scenes.toml: 1 bad scene entry",
                      'scene "a" (#1): has both `count` and `seeds`', "fix: keep one of them")
    _untouched(project)


def test_from_a_pose_map_says_to_pose_with_it(project: Path) -> None:
    """`--from` a map `loraforge pose` wrote said the image's scene record was damaged (the
    map's mark is a `loraforge` PNG text too), and to use the .json beside it: there is none."""
    from loraforge.generate.poses import random_pose_command

    random_pose_command(project / "poses.png", 2, "128x96", 0, None)
    result = _generate(project, "--from", "poses.png")
    assert_user_error(result, "poses.png: is a pose map written by `loraforge pose`, not a "
                      "generated image", "fix: pose a scene with it: loraforge generate --pose "
                      "poses.png")
    assert "damaged" not in result.stderr
    _untouched(project)


def test_a_scenes_file_with_a_bom_or_a_single_scene_table(project: Path) -> None:
    """Windows editors save UTF-8 with a BOM: read past it (here to the mistake on line 3).
    `[scene]` (one table) is not a list of scenes: say to write `[[scene]]`."""
    (project / "bom.toml").write_bytes(
        '\ufeff[[scene]]\nname = "beach"\nstepz = 3\n'.encode())
    result = _generate(project, "--scenes", "bom.toml", "--lora", "none")
    assert_user_error(result, 'scene "beach" (#1): unknown field `stepz`')
    (project / "single.toml").write_text('[scene]\nname = "beach"\nprompt = "sand"\n')
    result = _generate(project, "--scenes", "single.toml", "--lora", "none")
    assert_user_error(result, "single.toml: has a [scene] table (single brackets)",
                      "fix: write [[scene]] (double brackets) above each scene")
    _untouched(project)


def test_no_finished_run_lists_the_runs(project: Path) -> None:
    runs = project / "store" / "Multi_Concept_Output"
    for name, status in (("blake", "interrupted"), ("mira", "running")):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"name": name, "status": status}))
    result = _generate(project)
    assert_user_error(result, "no finished training run", "blake (interrupted)",
                      "mira (running)", "--lora")
    _untouched(project)


def test_help_shows_the_scenes_file_format() -> None:
    result = run_cli("generate", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0 and "TOML file of [[scene]] tables" in result.stdout
