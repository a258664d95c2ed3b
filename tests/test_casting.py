"""Casting on the tiny model: each figure wears its own LoRA and prompt in its region (the bleed
metric, with casting on and off), masks and PNG info are written, reruns are bit-identical, and
bad casts are refused before anything is rendered."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_user_error, draw_character, run_cli
from test_generate import _project, _write_run, make_lora

from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.generate import casting, pnginfo
from loraforge.generate.loras import BaseWidths, LoraStack, LoraUse, inspect_lora
from loraforge.generate.pipeline import compile_denoisers, load_pipeline, render_batch
from loraforge.generate.poses import (
    Person,
    PoseMap,
    draw_pose,
    random_pose,
    read_pose_json,
    write_pose_json,
)
from loraforge.generate.prompts import encode_prompts
from loraforge.generate.regions import (
    Regions,
    box_regions,
    closeness,
    figure_regions,
    map_boxes,
    separation,
)
from loraforge.generate.scenes import LoraResolver, Options, PoseCache, plan_jobs
from loraforge.samplers import SAMPLERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WIDTH, HEIGHT = 128, 96


@pytest.fixture(scope="module")
def characters(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> list[Path]:
    """Two character LoRAs that change the image strongly and differently."""
    folder = tmp_path_factory.mktemp("characters")
    base = tiny_store / "tiny-sd15"
    return [make_lora(folder / "red.safetensors", base, 11, scale=0.4),
            make_lora(folder / "blue.safetensors", base, 12, scale=0.4)]


@pytest.fixture(scope="module")
def stack(tiny_store: Path) -> LoraStack:
    return LoraStack(load_pipeline(tiny_store / "tiny-sd15", tiny_store / "tiny-controlnet",
                                   torch.device("cpu"), torch.float32))


def _render(stack: LoraStack, scene: list[LoraUse], own: list[LoraUse | None], seeds: list[int],
            cast: bool, background: float = 0.2, steps: int = 4, cfg: float = 7.0,
            ) -> tuple[list[np.ndarray], Any]:
    """The test scene: "a street" behind "a red knight" (left) and "a blue mage" (right)."""
    pipe = stack.pipe
    stack.activate(scene, [u.lora for u in own if u])
    figures = ["a red knight", "a blue mage"]
    poses = [random_pose(2, WIDTH, HEIGHT, seed) for seed in seeds]
    regions = [figure_regions(pose, WIDTH, HEIGHT) for pose in poses]
    if cast:
        layers = [stack.layers(u.lora) if u else {} for u in own]
        text = [casting.figure_deltas(lay, 1.0, "text_encoder") for lay in layers]
        unet = [casting.figure_deltas(lay, 1.0, "unet") for lay in layers]
        prompts = casting.encode_cast(pipe, "a street", "lowres", figures, text, 2, 3)
        embeds, negative = prompts.embeds, prompts.negative
        context = casting.regional(pipe, regions, background, WIDTH, HEIGHT, unet)
    else:
        embeds, negative = encode_prompts(pipe.tokenizer, pipe.text_encoder,
                                          [", ".join(["a street", *figures]), "lowres"], 2, 3)
        context = casting.contextlib.nullcontext()
    with context:
        images = render_batch(pipe, embeds, negative, WIDTH, HEIGHT, steps, cfg, seeds,
                              [draw_pose(p) for p in poses])
    return [np.asarray(image, dtype=np.int16) for image in images], regions


def test_casting_keeps_each_character_in_its_region_and_reruns_bit_identically(
        stack: LoraStack, characters: list[Path], tiny_store: Path) -> None:
    widths = BaseWidths.of(tiny_store / "tiny-sd15")
    red, blue = (LoraUse(inspect_lora(path, widths), 1.0) for path in characters)
    seeds = [3, 4]
    started = time.perf_counter()
    cast, regions = _render(stack, [], [red, blue], seeds, cast=True)
    cast_seconds = time.perf_counter() - started
    # references: the same cast scene with both figures wearing one character
    all_red, _ = _render(stack, [], [red, red], seeds, cast=True)
    all_blue, _ = _render(stack, [], [blue, blue], seeds, cast=True)
    started = time.perf_counter()
    plain, _ = _render(stack, [red, blue], [None, None], seeds, cast=False)
    plain_seconds = time.perf_counter() - started
    plain_red, _ = _render(stack, [red], [None, None], seeds, cast=False)
    plain_blue, _ = _render(stack, [blue], [None, None], seeds, cast=False)

    on = [separation(cast[i], [all_red[i], all_blue[i]], regions[i]) for i in range(2)]
    off = [separation(plain[i], [plain_red[i], plain_blue[i]], regions[i]) for i in range(2)]
    print(f"separation with casting {on}, without {off}; seconds for 2 images: casting "
          f"{cast_seconds:.2f}, plain {plain_seconds:.2f}")
    assert min(on) > 0.25, on  # each region is clearly closer to its own character
    assert min(on) - max(off) > 0.2, (on, off)

    again, _ = _render(stack, [], [red, blue], seeds, cast=True)
    assert all(np.array_equal(a, b) for a, b in zip(cast, again, strict=True))
    alone, _ = _render(stack, [], [red, blue], [4], cast=True)
    assert np.abs(alone[0] - cast[1]).max() <= 2  # batch of one = the batch's image, rounding
    stack.activate([])
    assert not any(name.endswith("attn2.processor") and
                   isinstance(p, casting.RegionalAttnProcessor)
                   for name, p in stack.pipe.unet.attn_processors.items())


@pytest.mark.slow
def test_trained_characters_of_one_lora_stay_in_their_regions(
        taught_run: tuple[Path, Any], taught_store: Path) -> None:
    """Issue #16 with trained concepts: the multi-concept run on the taught tiny base (red
    `blake`, blue `mira`, one LoRA), a two-figure scene cast "blake" | "mira" and, not cast, the
    prompt "blake, mira". Measured on the denoised latents (the taught base's VAE decoder is
    random, its pixels would hide the colours): with casting each region is closer to its own
    character's pictures than to the other's, and the bleed metric is clearly higher."""
    from PIL import Image

    from loraforge.generate.poses import read_pose_json

    work, _ = taught_run
    base = taught_store / "tiny-taught"
    pipe = load_pipeline(base, taught_store / "tiny-controlnet", torch.device("cpu"),
                         torch.float32)
    lora = work / "store" / "Multi_Concept_Output" / "ours" / "ours.safetensors"
    LoraStack(pipe).activate([LoraUse(inspect_lora(lora, BaseWidths.of(base)), 1.0)])
    pose = read_pose_json(_pose_file(work / "two.json", [(20, 50), (80, 110)]))
    regions = figure_regions(pose, WIDTH, HEIGHT)
    pooled = regions.figures.reshape(2, HEIGHT // 8, 8, WIDTH // 8, 8).mean(axis=(2, 4))
    latent_regions = Regions(regions.boxes, pooled)
    seeds = [1, 2, 3]

    def render(figures: list[str], cast: bool) -> list[np.ndarray]:
        if cast:
            prompts = casting.encode_cast(pipe, "", "lowres", figures, [{}, {}], 2, 3)
            embeds, negative = prompts.embeds, prompts.negative
            context = casting.regional(pipe, [regions] * len(seeds), 0.2, WIDTH, HEIGHT,
                                       [{}, {}])
        else:
            embeds, negative = encode_prompts(pipe.tokenizer, pipe.text_encoder,
                                              [", ".join(figures), "lowres"], 2, 3)
            context = casting.contextlib.nullcontext()
        with context:
            latents = render_batch(pipe, embeds, negative, WIDTH, HEIGHT, 8, 7.0, seeds,
                                   [draw_pose(pose)] * len(seeds), output_type="latent")
        return [latent.permute(1, 2, 0).numpy() for latent in latents]

    def look(colour: tuple[int, int, int]) -> np.ndarray:
        picture = np.asarray(Image.new("RGB", (64, 64), colour), dtype=np.float32) / 127.5 - 1
        with torch.no_grad():
            latent = pipe.vae.encode(torch.from_numpy(picture).permute(2, 0, 1)[None])
        return (latent.latent_dist.mean[0] * pipe.vae.config.scaling_factor).mean(dim=(1, 2)
                                                                                  ).numpy()

    from bench.separation import CONCEPTS

    looks = [look(colour) for _, _, _, colour in CONCEPTS]  # blake's red, mira's blue
    cast, plain = render(["blake", "mira"], True), render(["blake", "mira"], False)
    near_cast = [closeness(latent, looks, latent_regions) for latent in cast]
    near_plain = [closeness(latent, looks, latent_regions) for latent in plain]
    print(f"closeness with casting {near_cast}, without {near_plain}")
    assert min(min(scores) for scores in near_cast) > 0.2, near_cast
    # Without casting the two regions are no pair: what one gains, the other loses.
    assert np.mean(near_cast) - np.mean(near_plain) > 0.3, (near_cast, near_plain)

    all_blake, all_mira = render(["blake", "blake"], True), render(["mira", "mira"], True)
    alone_blake, alone_mira = render(["blake"], False), render(["mira"], False)
    on = [separation(cast[i], [all_blake[i], all_mira[i]], latent_regions) for i in range(3)]
    off = [separation(plain[i], [alone_blake[i], alone_mira[i]], latent_regions)
           for i in range(3)]
    print(f"separation with casting {on}, without {off}")
    assert min(on) > 0.3 and np.mean(on) - np.mean(off) > 0.3, (on, off)


def test_casting_runs_with_every_sampler_and_without_cfg(stack: LoraStack,
                                                         characters: list[Path],
                                                         tiny_store: Path) -> None:
    from loraforge.generate.pipeline import make_scheduler

    widths = BaseWidths.of(tiny_store / "tiny-sd15")
    red, blue = (LoraUse(inspect_lora(path, widths), 1.0) for path in characters)
    config = dict(stack.pipe.scheduler.config)
    plain = None
    try:
        for sampler in SAMPLERS:
            stack.pipe.scheduler = make_scheduler(sampler, config)
            image, _ = _render(stack, [], [red, blue], [5], cast=True, steps=2)
            plain = plain if plain is not None else _render(stack, [], [], [5], cast=False,
                                                            steps=2)[0][0]
            assert np.abs(image[0] - plain).mean() > 1, sampler  # the cast is live
        one, _ = _render(stack, [], [red, blue], [5], cast=True, steps=2, cfg=1.0)
        assert np.abs(one[0] - image[0]).mean() > 1  # no negative rows in the batch: works too
    finally:
        stack.pipe.scheduler = make_scheduler("DPM++ 2M Karras", config)


def _character_lora(source: Path, path: Path, concepts: dict[str, dict[str, int]],
                    trigger_phrase: str | None = None) -> Path:
    """A copy of `source` whose metadata says it was trained on `concepts` (kohya's
    ss_tag_frequency: folder -> tag counts), with `trigger_phrase` when given."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = dict(handle.metadata() or {})
    metadata["ss_tag_frequency"] = json.dumps(concepts)
    if trigger_phrase is not None:
        metadata["modelspec.trigger_phrase"] = trigger_phrase
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata)
    return path


def test_casting_renders_the_same_with_generate_compile(tiny_store: Path,
                                                         characters: list[Path]) -> None:
    """generate.compile = "blocks" and casting: a two-image batch of a cast scene, and a
    one-image batch after it, come out as eager casting renders them (cast batches run the
    compiled models eagerly)."""
    base = tiny_store / "tiny-sd15"
    own = [LoraUse(inspect_lora(path, BaseWidths.of(base)), 1.0) for path in characters]
    eager = LoraStack(load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                                    torch.float32))
    expected = {seeds: _render(eager, [], own, list(seeds), cast=True)[0]
                for seeds in ((1, 2), (3,))}
    pipe = load_pipeline(base, tiny_store / "tiny-controlnet", torch.device("cpu"),
                         torch.float32)
    compile_denoisers(pipe, "blocks")
    compiled = LoraStack(pipe)
    for seeds in ((1, 2), (3,)):
        images, _ = _render(compiled, [], own, list(seeds), cast=True)
        assert [np.abs(a - b).max() for a, b in zip(images, expected[seeds], strict=True)] \
            == [0] * len(seeds)


def test_characters_are_concepts_of_the_scene_lora_or_runs_of_their_own(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    runs = tmp_path / "store" / "Multi_Concept_Output"
    both = _character_lora(characters[0], tmp_path / "both.safetensors",
                           {"10_blake": {"blake": 4, "scarf": 1},
                            "10_mira_character": {"mira_c": 3, "mira": 1}})
    _write_run(runs, "multi", "finished", "2026-01-02T10:00:00+0000", both)
    _write_run(runs, "rook", "finished", "2026-01-01T10:00:00+0000", _character_lora(
        characters[1], tmp_path / "rook.safetensors", {"5_rook": {"rook knight": 2}}))
    _write_run(runs, "sora", "finished", "2026-01-01T09:00:00+0000", _character_lora(
        characters[1], tmp_path / "sora.safetensors", {"5_sora": {"sora": 2}}))
    plan = _planner(config, tiny_store)
    multi = plan("blake: smiling", "mira_character: arms crossed")
    assert [u.lora.path.name for u in multi.loras] == ["multi.safetensors"]  # everywhere
    assert [(f.text, f.lora) for f in multi.cast.figures] == [
        ("blake, smiling", None), ("mira_c, arms crossed", None)]
    own = plan("blake: smiling", "rook: (angry:1.2)")
    assert [u.lora.path.name for u in own.loras] == ["multi.safetensors"]
    assert own.cast.figures[1].text == "rook knight, (angry:1.2)"
    assert own.cast.figures[1].lora.lora.path.name == "rook.safetensors"
    assert own.pose.figures == 2
    # `--lora none`: no LoRA but the figures' own; a concept of the newest run is unknown.
    bare = plan("rook: a", "sora: b", loras=["none"])
    assert bare.loras == []
    assert [f.lora.lora.path.name for f in bare.cast.figures] == ["rook.safetensors",
                                                                 "sora.safetensors"]
    with pytest.raises(ForgeError, match="unknown character `blake`"):
        plan("blake: a", "rook: b", loras=["none"])
    # Figures with prompts alone: the newest run's LoRA acts, as without figures.
    prompts_only = plan("smiling", "arms crossed")
    assert [u.lora.path.name for u in prompts_only.loras] == ["multi.safetensors"]
    # A <lora:...> tag in a figure's prompt is that figure's own LoRA, not words.
    tagged = plan("blake: smiling <lora:rook:0.5>", "mira_character: arms crossed")
    assert tagged.cast.figures[0].text == "blake, smiling"
    assert (tagged.cast.figures[0].lora.lora.path.name, tagged.cast.figures[0].lora.weight) \
        == ("rook.safetensors", 0.5)
    for figures, needle in (
            (("blake: a", "mira_character: b <lora:nowhere:0.5>"), "nowhere"),
            (("blake: a <lora:rook> <lora:multi>", "mira_character: b"),
             "gives more than one LoRA"),
            (("blake: a", "mira_character: b <lora:multi:0.3>"),
             "its LoRA multi (weight 0.3) already acts on the whole image with weight 1"),
            (("blake: a", "nobody: b"), "(concepts: blake, mira_character; runs: multi, "
                                        "rook, sora)")):
        with pytest.raises(ForgeError, match=re.escape(needle)):
            plan(*figures)


def test_a_run_of_several_characters_named_as_one_is_refused_naming_them(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """`--figure "multi: hi"` put the run's name, a word its LoRA never learned, in the
    figure's prompt: no character acted there. It is refused, naming the run's characters and
    how to name one (with the run's LoRA when it does not act already); a run of one concept
    named as a character is still that concept, wearing the run's LoRA."""
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    runs = tmp_path / "store" / "Multi_Concept_Output"
    _write_run(runs, "multi", "finished", "2026-01-02T10:00:00+0000", _character_lora(
        characters[0], tmp_path / "multi.safetensors",
        {"10_blake": {"blake": 2}, "10_mira": {"mira": 2}}))
    _write_run(runs, "rook", "finished", "2026-01-01T10:00:00+0000", _character_lora(
        characters[1], tmp_path / "rook.safetensors", {"5_rook": {"rook knight": 2}}))
    plan = _planner(config, tiny_store)
    with pytest.raises(ForgeError) as newest:
        plan("multi: hi", "mira: x")
    assert str(newest.value) == (
        "--figure #1: `multi` is a training run of 2 characters (blake, mira), not one "
        'character\n  fix: name one of them: --figure "blake: ..."')
    with pytest.raises(ForgeError) as unworn:
        plan("rook: a", "multi: b", loras=["none"])
    assert unworn.value.fix == 'name one of them: --figure "blake: ..." with --lora multi'
    followed = plan("rook: a", "blake: b", loras=["multi"])
    assert [f.text for f in followed.cast.figures] == ["rook knight, a", "blake, b"]
    settings = load_settings(config)
    with pytest.raises(ForgeError) as in_file:
        plan_jobs(settings, Options(scenes=_scene(
            tmp_path, "random", '[[scene.figure]]\ncharacter = "multi"\n'
                                '[[scene.figure]]\ncharacter = "rook"\n')),
            LoraResolver(settings, BaseWidths.of(tiny_store / "tiny-sd15")),
            PoseCache(print, None))
    assert 'field `figure` #1: `multi` is a training run of 2 characters' in str(in_file.value)
    assert 'fix: name one of them: character = "blake"' in str(in_file.value)


def _planner(config: Path, tiny_store: Path) -> Callable[..., Any]:
    """The scene `generate --pose random --seed 1 --figure F ...` plans, for figures F."""
    settings = load_settings(config)
    resolver = LoraResolver(settings, BaseWidths.of(tiny_store / "tiny-sd15"))

    def plan(*figures: str, loras: list[str] | None = None) -> Any:
        return plan_jobs(settings, Options(pose="random", cast=list(figures), seed=1,
                                           loras=loras), resolver, PoseCache(print, None))[0]
    return plan


def test_figure_option_names_a_concept_as_its_folder_spells_it(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """`--figure "NAME: prompt"` takes NAME as a character when a dataset folder could be
    named so (spaces, any script), and a typo in it is caught; prompt syntax before the first
    colon (A1111 weights, a <lora:> tag, a comma) keeps the whole text a prompt."""
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    _write_run(tmp_path / "store" / "Multi_Concept_Output", "multi", "finished",
               "2026-01-02T10:00:00+0000", _character_lora(
                   characters[0], tmp_path / "multi.safetensors",
                   {"10_ohwx man": {"ohwx man": 3}, "10_ブレイク": {"ブレイク": 2}}))
    plan = _planner(config, tiny_store)
    named = plan("ohwx man: smiling", " ブレイク : waving")
    assert [(f.character, f.text) for f in named.cast.figures] == [
        ("ohwx man", "ohwx man, smiling"), ("ブレイク", "ブレイク, waving")]
    ime = plan("ブレイク：笑顔", "ohwx man： 1:2 scale")  # full-width colons, as an IME types
    assert [(f.character, f.text) for f in ime.cast.figures] == [
        ("ブレイク", "ブレイク, 笑顔"), ("ohwx man", "ohwx man, 1:2 scale")]
    assert [u.lora.path.name for u in named.loras] == ["multi.safetensors"]
    prompts = plan("(smile:1.2), a knight: left", "a mage, red scarf: right")
    assert [(f.character, f.text) for f in prompts.cast.figures] == [
        (None, "(smile:1.2), a knight: left"), (None, "a mage, red scarf: right")]
    tagged = plan("<lora:multi:0.5> smiling", ": close-up: waving")
    assert [(f.character, f.text) for f in tagged.cast.figures] == [
        (None, "smiling"), (None, "close-up: waving")]
    assert tagged.cast.figures[0].lora.weight == 0.5
    with pytest.raises(ForgeError) as typo:
        plan("ohwx mann: sitting", "ブレイク: waving")
    assert "--figure #1: unknown character `ohwx mann` (did you mean `ohwx man`?)" \
        in str(typo.value)
    assert '--figure ": ohwx mann: ..."' in (typo.value.fix or "")


def test_a_character_is_cast_with_the_trigger_eval_measures(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """One of blake's captions lacks his name, so `1boy` is his most frequent tag: his figure's
    prompt still starts with `blake`, the trigger `dataset check` and `eval` take (it started
    with `1boy`, and blake was never asked for). A concept whose captions never name it is cast
    with the first tag of most of its captions (a token of its own: `nx`, missing from one
    caption, is not outnumbered by `1girl`, which all hold), as eval and the LoRA's
    trigger_phrase take it."""
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.separation import distinct_triggers

    dataset = tmp_path / "master_dataset"
    captions = {"10_blake": ["blake, 1boy, red scarf", "blake, 1boy", "blake, 1boy, smile",
                             "1boy, smile"],
                "10_mira": ["mira, 1girl", "mira, 1girl, smile", "mira, 1girl"],
                "10_sora": ["ohwx, 1girl", "ohwx, 1girl, hat"],
                "10_nia": ["nx, 1girl", "nx, 1girl, hat", "1girl, hat"]}
    for folder, texts in captions.items():
        (dataset / folder).mkdir(parents=True)
        for index, text in enumerate(texts):
            draw_character(dataset / folder / f"{index}.png", (200, 30, 30), "box", index)
            (dataset / folder / f"{index}.txt").write_text(text)
    trained = scan_dataset(dataset, ".txt")
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    _write_run(tmp_path / "store" / "Multi_Concept_Output", "multi_concept", "finished",
               "2026-01-02T10:00:00+0000", _character_lora(
                   characters[0], tmp_path / "multi.safetensors", trained.tag_frequency(),
                   ", ".join(concept.trigger for concept in trained.concepts)))
    plan = _planner(config, tiny_store)
    assert [f.text for f in plan("blake: smiling", "mira: waving").cast.figures] == [
        "blake, smiling", "mira, waving"]
    assert [f.text for f in plan("sora: sitting", "mira: waving").cast.figures] == [
        "ohwx, sitting", "mira, waving"]
    assert [f.text for f in plan("nia: sitting", "mira: waving").cast.figures] == [
        "nx, sitting", "mira, waving"]
    assert distinct_triggers(trained) == {"blake": "blake", "mira": "mira", "nia": "nx",
                                          "sora": "ohwx"}


def test_a_figure_lora_over_the_whole_image_renders_what_the_merged_lora_renders(
        stack: LoraStack, characters: list[Path], tiny_store: Path) -> None:
    red = LoraUse(inspect_lora(characters[0], BaseWidths.of(tiny_store / "tiny-sd15")), 0.7)
    pipe = stack.pipe
    everywhere = [Regions(((0.0, 0.0, WIDTH, HEIGHT),), np.ones((1, HEIGHT, WIDTH), np.float32))]
    pose = draw_pose(random_pose(1, WIDTH, HEIGHT, 2))
    stack.activate([])
    prompts = casting.encode_cast(pipe, "a street", "lowres", ["a red knight"], [{}], 2, 3)

    def render(own: list[dict[Any, Any]]) -> np.ndarray:
        # background weight 0: only the figure's token slot is attended to, and the merged
        # LoRA's to_k/to_v change every slot, the figure's LoRA its own slot alone
        with casting.regional(pipe, everywhere, 0.0, WIDTH, HEIGHT, own):
            image = render_batch(pipe, prompts.embeds, prompts.negative, WIDTH, HEIGHT, 3, 7.0,
                                 [9], [pose])[0]
        return np.asarray(image, dtype=np.int16)

    stack.activate([], [red.lora])
    masked = render([casting.figure_deltas(stack.layers(red.lora), 0.7, "unet")])
    stack.activate([red])
    merged = render([{}])
    stack.activate([])
    base = render([{}])
    assert np.abs(masked - merged).max() <= 2
    assert np.abs(base - merged).mean() > 5  # the LoRA changes the image


def test_a_figure_too_small_to_cast_is_refused_and_soft_edges_keep_the_figures() -> None:
    """A figure given only its neck would get no region (its character would never act):
    refused, naming it. The widest softening keeps every figure's own weight above one half
    somewhere inside it."""
    neck_only = Person(tuple([None, (90.0, 40.0)] + [None] * 16))
    standing = random_pose(1, 60, HEIGHT, 3).people[0]
    with pytest.raises(ForgeError, match=re.escape("figure 2 (from the left) is too small "
                                                   "to cast")) as small:
        figure_regions(PoseMap(WIDTH, HEIGHT, (standing, neck_only)), WIDTH, HEIGHT)
    # every posed figure is checked, so casting one fewer alone cannot help
    assert "take it out of the pose, and its [[scene.figure]] (--figure) out of the cast" \
        in (small.value.fix or "")
    boxes = [(10.0, 10.0, 40.0, 90.0), (50.0, 10.0, 80.0, 90.0), (90.0, 10.0, 120.0, 90.0)]
    soft = box_regions(boxes, WIDTH, HEIGHT, pad=0.0, soften=0.25)
    assert all(float(mask.max()) > 0.5 for mask in soft.figures)


def test_regions_from_keypoints_and_from_a_drawn_map_agree() -> None:
    people = tuple(reversed(random_pose(3, WIDTH * 2, HEIGHT, 4).people))  # right to left
    pose = PoseMap(WIDTH * 2, HEIGHT, people)
    keypoints = figure_regions(pose, WIDTH * 2, HEIGHT, pad=0.1)
    assert [box[0] for box in keypoints.boxes] == sorted(box[0] for box in keypoints.boxes)
    drawn = map_boxes(draw_pose(pose))
    assert len(drawn) == 3
    for inked, box in zip(drawn, keypoints.boxes, strict=True):  # ink: the box plus strokes
        assert inked[0] <= box[0] < box[2] <= inked[2] and inked[1] <= box[1]
        assert box[0] - inked[0] < 4 and inked[2] - box[2] < 4
    regions = box_regions(drawn, WIDTH * 2, HEIGHT, pad=0.1, soften=0.05)
    assert regions.figures.sum(axis=0).max() <= 1.0 + 1e-6
    assert (regions.background() > 0.99).any() and (regions.figures[1] > 0.99).any()
    agree = (regions.figures.argmax(axis=0) == keypoints.figures.argmax(axis=0))
    assert agree[keypoints.figures.max(axis=0) > 0.5].mean() > 0.95


def _pose_file(path: Path, boxes: list[tuple[float, float]]) -> Path:
    """An OpenPose JSON with one standing figure per (left x, right x)."""
    people = []
    for left, right in boxes:
        mid = (left + right) / 2
        points: list[tuple[float, float] | None] = [(mid, 15.0), (mid, 25.0)] + [None] * 16
        points[2], points[5] = (left, 27.0), (right, 27.0)
        points[10], points[13] = (left + 2, 88.0), (right - 2, 88.0)
        people.append(Person(tuple(points)))
    write_pose_json(path, PoseMap(WIDTH, HEIGHT, tuple(people)))
    return path


def _scene(tmp_path: Path, pose: str, figures: str) -> Path:
    scenes = tmp_path / "scenes.toml"
    scenes.write_text(f'[[scene]]\nname = "market"\nprompt = "market street"\npose = "{pose}"\n'
                      f'seeds = [3, 4]\nbackground_weight = 0.3\n{figures}')
    return scenes


FIGURES = ('[[scene.figure]]\nlora = "red.safetensors:0.9"\nprompt = "smiling"\n'
           '[[scene.figure]]\nlora = "blue.safetensors"\nprompt = "arms crossed"\n')


def test_a_cast_scenes_file_writes_masks_and_png_info_and_from_renders_it_again(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "steps": 2})
    for path in characters:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _pose_file(tmp_path / "two.json", [(20, 50), (80, 110)])
    scenes = _scene(tmp_path, "two.json", FIGURES)
    settings = load_settings(config)
    lines: list[str] = []
    written = generate(settings, Options(scenes=scenes), lines.append)
    images = tmp_path / "store" / "Final_Images"
    assert written == [images / "market-3.png", images / "market-4.png"]
    assert any(line.startswith('market: figure 2: "arms crossed", LoRA ') and
               "blue.safetensors (weight 1) in its region" in line for line in lines), lines
    first = [path.read_bytes() for path in written]
    from PIL import Image

    with Image.open(images / "market-3.masks.png") as masks:
        rgb = np.asarray(masks.convert("RGB"))
    assert rgb.shape == (HEIGHT, WIDTH, 3)
    assert tuple(rgb[50, 35]) == (230, 60, 60) and tuple(rgb[50, 95]) == (60, 110, 235)
    assert rgb[50, 65].max() == 0 and rgb[2, 2].max() == 0  # between and above: background
    info = pnginfo.parse_parameters(pnginfo.read_parameters(written[0]) or "")
    # Regional Prompter's parts, each figure's own LoRA as an A1111 tag in its part.
    assert info["prompt"] == \
        "market street BREAK smiling <lora:red:0.9> BREAK arms crossed <lora:blue:1>"
    assert (info["RP Active"], info["RP Use Base"], info["RP Base Ratios"]) == \
        ("True", "True", "0.3")
    assert [name for name, _ in info["lora_hashes"]] == ["red", "blue"]
    sidecar = json.loads((images / "market-3.json").read_text())
    assert [f["lora"]["weight"] for f in sidecar["cast"]["figures"]] == [0.9, 1.0]
    copy = tmp_path / "keep.png"
    copy.write_bytes(first[1])
    (tmp_path / "two.json").unlink()  # the image records the keypoints themselves
    for path in written:
        path.unlink()
    # the batch the image was denoised in, rendered again: the same bits
    assert generate(settings, Options(source=copy), lambda line: None) == written
    assert [path.read_bytes() for path in written] == first


def test_other_regions_or_an_edited_pose_keep_the_earlier_image_and_from_honours_them(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """A cast scene rendered with region_pad 0.6, then with the default padding, then after
    its pose file was edited: each earlier image is kept (`-v2`, `-v3`), and `--from` the
    first renders it bit for bit though the config now says otherwise."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "steps": 2})
    for path in characters:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _pose_file(tmp_path / "two.json", [(20, 50), (80, 110)])
    scenes = _scene(tmp_path, "two.json", FIGURES)
    padded = generate(load_settings(config, ["generate.region_pad=0.6"]),
                      Options(scenes=scenes), lambda line: None)
    first = padded[0].read_bytes()
    plain = generate(load_settings(config), Options(scenes=scenes), lambda line: None)
    _pose_file(tmp_path / "two.json", [(10, 45), (85, 115)])
    edited = generate(load_settings(config), Options(scenes=scenes), lambda line: None)
    images = tmp_path / "store" / "Final_Images"
    assert [p.name for p in padded + plain + edited] == [
        "market-3.png", "market-4.png", "market-3-v2.png", "market-4-v2.png",
        "market-3-v3.png", "market-4-v3.png"]
    assert padded[0].read_bytes() == first
    assert json.loads((images / "market-3.json").read_text())["cast"]["pad"] == 0.6
    copy = tmp_path / "keep.png"
    copy.write_bytes(first)
    again = generate(load_settings(config), Options(source=copy), lambda line: None)
    assert again == padded and padded[0].read_bytes() == first


def test_an_uncast_image_made_in_place_of_a_cast_one_leaves_no_masks_of_it(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """A cast image deleted, and its scene rendered again uncast: the image is made in its
    place, and the cast one's masks beside it (which no longer belonged to any image) go."""
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "steps": 2})
    for path in characters:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _pose_file(tmp_path / "two.json", [(20, 50), (80, 110)])
    cast = generate(load_settings(config), Options(scenes=_scene(tmp_path, "two.json", FIGURES)),
                    lambda line: None)
    images = tmp_path / "store" / "Final_Images"
    assert (images / "market-3.masks.png").is_file()
    cast[0].unlink()
    plain = generate(load_settings(config), Options(scenes=_scene(tmp_path, "two.json", ""),
                                                    loras=["none"]), lambda line: None)
    assert [p.name for p in plain] == ["market-3.png", "market-4-v2.png"]
    assert json.loads((images / "market-3.json").read_text())["cast"] is None
    assert not (images / "market-3.masks.png").exists()
    assert (images / "market-4.masks.png").is_file()  # the cast image kept beside -v2


@pytest.mark.parametrize(("pose", "figures", "needle"), [
    ("three.json", FIGURES, "has 3 figures, the scene casts 2"),
    ("overlap.json", FIGURES, "figures 1 and 2 (from the left) overlap"),
    ("empty.json", FIGURES, "draws no figure on its 128x96 canvas (no people"),
    ("random", '[[scene.figure]]\ncharacter = "nobody"\n', "unknown character `nobody`"),
    # not a run: the folder two levels above the runs
    ("random", '[[scene.figure]]\ncharacter = "../.."\n', "unknown character `../..`"),
    ("drawn.png", FIGURES, "has 3 figures, the scene casts 2"),
])
def test_bad_casts_are_refused_before_rendering(tmp_path: Path, tiny_store: Path,
                                                characters: list[Path], pose: str,
                                                figures: str, needle: str) -> None:
    from loraforge.generate.run import generate

    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "steps": 2})
    for path in characters:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _pose_file(tmp_path / "three.json", [(5, 30), (50, 75), (95, 120)])
    _pose_file(tmp_path / "overlap.json", [(20, 70), (60, 110)])
    write_pose_json(tmp_path / "empty.json", PoseMap(WIDTH, HEIGHT, ()))
    draw_pose(random_pose(3, 192, HEIGHT, 1)).save(tmp_path / "drawn.png")
    (tmp_path / "store" / "Multi_Concept_Output").mkdir(parents=True)  # the runs, none yet
    with pytest.raises(ForgeError) as caught:
        generate(load_settings(config), Options(scenes=_scene(tmp_path, pose, figures)),
                 lambda line: None)
    assert needle in str(caught.value)
    assert not (tmp_path / "store" / "Final_Images").exists()


def test_a_pose_that_cannot_hold_the_cast_says_a_fix_that_works(
        tmp_path: Path, tiny_store: Path, characters: list[Path]) -> None:
    """Figures whose strokes touch in a drawn map count as one: the message says so and names
    the pose's JSON, which casts them. Overlapping figures are mended in the pose or left
    uncast: every posed figure is checked, so casting one fewer alone cannot help."""
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    for path in characters:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    close = _pose_file(tmp_path / "close.json", [(20, 50), (53, 83)])
    draw_pose(read_pose_json(close)).save(tmp_path / "close.png")
    settings = load_settings(config)
    resolver = LoraResolver(settings, BaseWidths.of(tiny_store / "tiny-sd15"))

    def plan(pose: str) -> Any:
        return plan_jobs(settings, Options(scenes=_scene(tmp_path, pose, FIGURES)), resolver,
                         PoseCache(print, None))[0]

    with pytest.raises(ForgeError) as touching:
        plan("close.png")
    assert ("has 1 figure (in a drawn pose map, figures that touch or share columns count as "
            "one") in str(touching.value)
    assert f"pose with {close} instead" in str(touching.value)
    assert len(plan("close.json").cast.figures) == 2
    with pytest.raises(ForgeError) as overlap:
        box_regions([(10.0, 10.0, 60.0, 90.0), (50.0, 10.0, 100.0, 90.0)], WIDTH, HEIGHT)
    assert "or render the scene uncast (no [[scene.figure]] or --figure)" in \
        (overlap.value.fix or "")
    assert "one character fewer" not in (overlap.value.fix or "")


def test_from_an_image_without_a_scene_record_is_refused(tmp_path: Path,
                                                         tiny_store: Path) -> None:
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT})
    draw_pose(random_pose(1, WIDTH, HEIGHT, 1)).save(tmp_path / "other.png")
    result = run_cli("generate", "--config", config, "--from", tmp_path / "other.png",
                     env={"OMP_NUM_THREADS": "1"})
    assert_user_error(result, "other.png", "holds no LoRA Forge scene record", "fix:")
    ignored = run_cli("generate", "--config", config, "--from", tmp_path / "other.png",
                      "--steps", "4", "--seed", "3", "--figure", "x", env={"OMP_NUM_THREADS": "1"})
    assert_user_error(ignored, "--from renders the image's recorded scene as it was, so it "
                      "takes no --seed, --steps, --figure", "scenes file")
    folder = run_cli("generate", "--config", config, "--from", tmp_path)  # "image not found"
    assert_user_error(folder, "is a folder; --from takes one image", "scene-42.png")
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from loraforge.generate.pnginfo import SCENE_KEY

    for name, record, needles in (
            ("cut.png", '{"scene": {"prompt": "a kn', ("scene record that is damaged",
                                                      "the .json beside the image")),
            ("edited.png", json.dumps({"scene": {"prompt": "a knight", "steps": 0}}),
             ("the scene it records is not usable", "`steps`", "record was edited"))):
        info = PngInfo()
        info.add_text(SCENE_KEY, record)
        Image.open(tmp_path / "other.png").save(tmp_path / name, pnginfo=info)
        result = run_cli("generate", "--config", config, "--from", tmp_path / name)
        assert_user_error(result, f"{name}: ", *needles)


def test_only_a_figure_count_given_beside_a_pose_file_is_held_to_it(
        tmp_path: Path, tiny_store: Path) -> None:
    """A scene's figure count beside a pose file of another number of figures is refused, not
    ignored. `generate.figures` (random poses' count) is no such mistake, nor the count an
    image records beside its drawn pose map (asked, and ignored, before such counts were
    refused): `--from` renders it."""
    from PIL import Image

    from loraforge.generate.poses import random_pose_command

    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "figures": 3})
    random_pose_command(tmp_path / "two.png", 2, f"{WIDTH}x{HEIGHT}", 0, tmp_path / "two.json")
    settings = load_settings(config)
    resolver = LoraResolver(settings, BaseWidths.of(tiny_store / "tiny-sd15"))

    def plan(options: Options) -> Any:
        return plan_jobs(settings, options, resolver, PoseCache(print, None))[0]

    pose = tmp_path / "two.png"
    with pytest.raises(ForgeError, match=re.escape(f"asks for 3 figures, but the pose {pose} "
                                                   "has 2")):
        plan(Options(pose=str(tmp_path / "two.png"), figures=3, loras=["none"]))
    assert plan(Options(pose=str(tmp_path / "two.json"), loras=["none"])).pose.figures == 3
    made = tmp_path / "made.png"
    pnginfo.save_png_with_scene(Image.new("RGB", (WIDTH, HEIGHT)), made, None, {"scene": {
        "name": "made", "pose": "two.png", "figures": 3, "seeds": [1], "loras": ["none"]}})
    assert plan(Options(source=made)).pose.path == tmp_path / "two.png"


def test_command_refuses_a_figure_count_the_pose_does_not_have(tmp_path: Path,
                                                               tiny_store: Path) -> None:
    config = _project(tmp_path, tiny_store, {"width": WIDTH, "height": HEIGHT, "steps": 2})
    result = run_cli("generate", "--config", config, "--pose", "random", "--figures", "3",
                     "--lora", "none", "--figure", "a knight", "--figure", "a mage",
                     env={"OMP_NUM_THREADS": "1"})
    assert_user_error(result, "--figures: asks for 3 figures, the scene casts 2", "fix:")
    assert not (tmp_path / "store" / "Final_Images").exists()
