"""Preview prompts (kohya line flags), their file names, and the prompts x epochs grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path

import pytest
from PIL import Image

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.sample_prompts import MAX_SEED
from loraforge.train.previews import (
    GAP,
    LABEL_LEFT,
    LABEL_TOP,
    MISSING,
    SamplePrompt,
    SamplePromptDefaults,
    defaults_from_config,
    grid_image,
    parse_sample_prompt,
    parse_sample_prompts,
    preview_path,
    sample_epochs,
    slug,
    write_grid,
)

DEFAULTS = SamplePromptDefaults(negative="", width=512, height=512, seed=100, steps=20, cfg=7.0)


def test_every_flag_is_read() -> None:
    line = "blake, standing --n lowres, bad hands --w 600 --h 765 --d 7 --s 30 --l 6.5"
    assert parse_sample_prompt(line, DEFAULTS) == SamplePrompt(
        prompt="blake, standing", negative="lowres, bad hands", width=600, height=768, seed=7,
        steps=30, cfg=6.5)


def test_flag_order_and_spacing_do_not_matter() -> None:
    a = parse_sample_prompt("a cat --w 640 --n ugly --l 5", DEFAULTS)
    b = parse_sample_prompt("a cat   --l 5  --n ugly   --w 640", DEFAULTS)
    assert a == b
    assert (a.prompt, a.negative, a.width, a.cfg) == ("a cat", "ugly", 640, 5.0)


def test_defaults_and_a_fixed_seed_per_prompt_index() -> None:
    first = parse_sample_prompt("a cat", DEFAULTS, index=0)
    third = parse_sample_prompt("a dog", DEFAULTS, index=2)
    assert first == SamplePrompt("a cat", "", 512, 512, 100, 20, 7.0)
    assert third.seed == 102
    assert parse_sample_prompt("a dog", DEFAULTS, index=2).seed == third.seed
    assert parse_sample_prompt("a dog --d 5", DEFAULTS, index=2).seed == 5
    assert parse_sample_prompt("a dog", DEFAULTS, width=768).width == 768
    assert parse_sample_prompt("a dog").width == SamplePromptDefaults().width


def test_the_default_seed_of_a_later_prompt_wraps_past_the_largest_seed() -> None:
    last = dataclasses.replace(DEFAULTS, seed=MAX_SEED)
    assert parse_sample_prompt("a cat", last, index=0).seed == MAX_SEED
    assert parse_sample_prompt("a dog", last, index=2).seed == 1


def test_sizes_round_to_multiples_of_8_with_a_minimum() -> None:
    prompt = parse_sample_prompt("x --w 10 --h 515", DEFAULTS)
    assert (prompt.width, prompt.height) == (64, 512)
    assert parse_sample_prompt("x --h 516", DEFAULTS).height == 520


def test_dashes_inside_the_prompt_are_text() -> None:
    prompt = parse_sample_prompt("well-lit room -- night, a--b --s 12", DEFAULTS)
    assert (prompt.prompt, prompt.steps) == ("well-lit room -- night, a--b", 12)


def test_unknown_flag_names_it_the_line_and_the_known_ones() -> None:
    line = "a cat --w 512 --q 3"
    with pytest.raises(ForgeError) as info:
        parse_sample_prompt(line, DEFAULTS)
    text = str(info.value)
    assert "--q" in text and line in text
    for flag in ("--n", "--w", "--h", "--d", "--s", "--l"):
        assert flag in text


@pytest.mark.parametrize("line, flag", [
    ("a cat --w wide", "--w"), ("a cat --h 51.5", "--h"), ("a cat --l nan", "--l"),
    ("a cat --l seven", "--l"), ("a cat --s 0", "--s"), ("a cat --d -1", "--d"),
    ("a cat --s", "--s"), ("a cat --w 512 --w 640", "--w"),
])
def test_bad_values_are_clear_errors(line: str, flag: str) -> None:
    with pytest.raises(ForgeError) as info:
        parse_sample_prompt(line, DEFAULTS)
    assert flag in str(info.value)


def test_a_line_needs_prompt_text() -> None:
    with pytest.raises(ForgeError, match="no prompt text"):
        parse_sample_prompt("--w 512", DEFAULTS)


def test_prompt_list_skips_blanks_and_comments() -> None:
    prompts = parse_sample_prompts(["a cat", "", "# a note", "a dog --s 9"], DEFAULTS)
    assert [(p.prompt, p.seed, p.steps) for p in prompts] == [("a cat", 100, 20),
                                                              ("a dog", 101, 9)]


def test_defaults_come_from_the_resolved_config(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, ["dataset.resolution=768", "train.seed=9",
                                    "train.sample_steps=12", "generate.cfg=5.5"])
    assert defaults_from_config(settings.to_dict()) == SamplePromptDefaults("", 768, 768, 9, 12,
                                                                              5.5)


def test_slug_is_safe_and_short() -> None:
    assert slug("Masterpiece, Blake (smiling:1.2)") == "masterpiece-blake-smiling-1-2"
    long = slug("masterpiece, best quality, blake standing in a sunny field of flowers")
    assert len(long) <= 40 and long.startswith("masterpiece-best-quality") \
        and not long.endswith("-")
    assert slug("Café <lora:x:1> ../../etc") == "cafe-lora-x-1-etc"
    assert slug("!!! ???") == "prompt"
    assert len(slug("a" * 100)) == 40


def test_preview_path(tmp_path: Path) -> None:
    prompt = SamplePrompt("Blake, standing", "", 512, 512, 1, 20, 7.0)
    assert preview_path(tmp_path, 3, 1, prompt) == \
        tmp_path / "samples" / "epoch-003" / "1-blake-standing.png"
    assert preview_path(tmp_path, 12, 0, "a cat").name == "0-a-cat.png"


def _previews(run_dir: Path, prompts: list[SamplePrompt], epochs: list[int],
              skip: Collection[tuple[int, int]] = ()) -> None:
    for epoch in epochs:
        for index, prompt in enumerate(prompts):
            if (index, epoch) in skip:
                continue
            path = preview_path(run_dir, epoch, index, prompt)
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = (40 * epoch % 256, 200 if index else 20, 90)
            Image.new("RGB", (prompt.width, prompt.height), colour).save(path)


def test_grid_has_a_row_per_prompt_and_a_column_per_epoch_on_disk(tmp_path: Path) -> None:
    prompts = [SamplePrompt("a cat", "", 512, 512, 1, 20, 7.0),
               SamplePrompt("a dog", "", 512, 768, 2, 20, 7.0)]
    _previews(tmp_path, prompts, [1, 2, 3], skip={(1, 2)})
    grid = grid_image(tmp_path, prompts, [1, 2, 3, 4])  # epoch 4 has no previews
    cell_w, cell_h = round(512 * 256 / 768), 256
    assert grid.size == (LABEL_LEFT + 3 * (cell_w + GAP), LABEL_TOP + 2 * (cell_h + GAP))
    x_epoch2 = LABEL_LEFT + (cell_w + GAP) + cell_w // 2
    y_row1 = LABEL_TOP + (cell_h + GAP) + cell_h // 2
    assert grid.getpixel((x_epoch2, y_row1)) == MISSING
    y_row0 = LABEL_TOP + cell_h // 2
    assert grid.getpixel((x_epoch2, y_row0)) == (80, 20, 90)


def test_write_grid_covers_epochs_up_to_the_one_given(tmp_path: Path) -> None:
    prompts = [SamplePrompt("a cat", "", 256, 256, 1, 20, 7.0)]
    assert write_grid(tmp_path, prompts, 1) is None
    _previews(tmp_path, prompts, [1, 2, 3])
    assert sample_epochs(tmp_path) == [1, 2, 3]
    path = write_grid(tmp_path, prompts, 2, 0o640)
    assert path == tmp_path / "samples" / "grid-epoch-002.png"
    with Image.open(path) as grid:
        assert grid.size == (LABEL_LEFT + 2 * (256 + GAP), LABEL_TOP + 256 + GAP)
    assert path.stat().st_mode & 0o777 == 0o640
    assert not list(path.parent.glob(".*.tmp"))
