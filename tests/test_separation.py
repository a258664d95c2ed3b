"""`loraforge eval`: each concept's loss with its own trigger, every other trigger and no LoRA,
at fixed noise and timesteps; written beside the run and shown in its report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_user_error, draw_character, run_cli, write_training_project
from PIL import Image
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.config import load_settings
from loraforge.errors import ForgeError
from loraforge.runtime import go_offline
from loraforge.train.run import train
from loraforge.train.separation import ConceptSeparation, Separation, measure

RUN = "sep"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path,
            one_torch_thread: None) -> Path:
    """A finished two-concept run (red_knight, blue_mage); returns its forge.toml."""
    root = tmp_path_factory.mktemp("separation")
    config = write_training_project(root, tiny_store, {"epochs": 4, "unet_lr": 1e-2,
                                                       "text_encoder_lr": 2e-3})
    saved = dict(os.environ)
    go_offline(load_settings(config))
    try:
        train(load_settings(config), RUN, restart=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return config


def test_eval_measures_every_concept_under_every_trigger(project: Path) -> None:
    result = CliRunner().invoke(app, ["eval", RUN, "--json", "--config", str(project)])
    assert result.exit_code == 0, (result.output, result.exception)
    shown = json.loads(result.output)
    run_dir = load_settings(project).runs_dir / RUN
    assert json.loads((run_dir / "separation.json").read_text()) == shown
    rows = {row["name"]: row for row in shown["concepts"]}
    assert {name: row["trigger"] for name, row in rows.items()} == {
        "red_knight": "red_knight", "blue_mage": "blue_mage"}
    for row in rows.values():
        assert set(row["loss"]) == {"red_knight", "blue_mage"}
        assert row["images"] == 2 and row["held_out"] is False
        assert len(row["by_timestep"]["no LoRA"]) == len(shown["timesteps"])
        # The LoRA learned the images: below the base model under the concept's own trigger.
        assert row["loss"][row["trigger"]] < row["no_lora"]
    assert [p["concepts"] for p in shown["pairs"]] == [["blue_mage", "red_knight"]]
    page = (run_dir / "report.html").read_text()
    assert "Concept separation" in page and "“blue_mage”" in page
    # What it was measured with: the run's base model and dataset, no held-out pictures.
    record = json.loads((run_dir / "run.json").read_text())
    assert (shown["base_model"], shown["held_out"]) == (record["base_model"], None)
    assert shown["dataset"] == str(load_settings(project).dataset_dir) and not shown["notes"]
    assert f"base model <code>{record['base_model']}</code>" in page
    assert "blue_mage / red_knight: " in page
    # Fixed noise and timesteps: measuring again gives the same numbers.
    again = measure(load_settings(project), run_dir)
    assert [c.to_dict() for c in again.concepts] == shown["concepts"]


@pytest.mark.slow
def test_our_trainer_learns_concepts_apart_as_well_as_an_independent_loop(
        taught_run: tuple[Path, Separation], taught_oracle: Separation) -> None:
    """Issue #21 on the taught tiny base: red `blake` and blue `mira`, flat-colour pictures (what
    that base can paint), triggers it has never seen. A plain diffusers + peft loop shows the
    setup can be learned apart; `loraforge train` with its defaults for multi-concept runs must
    do at least about as well, measured on held-out pictures with `loraforge eval`'s measure."""
    _, result = taught_run
    reference = taught_oracle
    assert all(row.held_out for row in reference.concepts + result.concepts)
    assert min(row.margin for row in reference.concepts) > 0.1, reference.to_dict()
    for row in result.concepts:
        # Its own trigger calls it up clearly better than the other's, and than no LoRA.
        assert row.margin > 0.1 and row.own < row.no_lora, result.to_dict()
    assert result.pairs()[0][2] >= 0.8 * reference.pairs()[0][2], (result.pairs(),
                                                                   reference.pairs())


def test_held_out_images_are_used_where_given(project: Path, tmp_path: Path) -> None:
    held = tmp_path / "held"
    (held / "1_red_knight").mkdir(parents=True)
    draw_character(held / "1_red_knight" / "new.png", (210, 40, 30), "box", offset=5)
    result = measure(load_settings(project), load_settings(project).runs_dir / RUN, held)
    rows = {row.name: row for row in result.concepts}
    assert (rows["red_knight"].held_out, rows["red_knight"].images) == (True, 1)
    assert (rows["blue_mage"].held_out, rows["blue_mage"].images) == (False, 2)

    (held / "1_green_elf").mkdir()
    draw_character(held / "1_green_elf" / "x.png", (30, 200, 30), "box", offset=0)
    with pytest.raises(ForgeError, match="green_elf match no concept") as caught:
        measure(load_settings(project), load_settings(project).runs_dir / RUN, held)
    assert "blue_mage, red_knight" in str(caught.value.fix)


def test_a_bad_held_out_folder_gets_the_eval_fix_not_the_datasets(project: Path,
                                                                   tmp_path: Path) -> None:
    """The held-out folder is not dataset.path: its fixes must not send the user to edit
    forge.toml or to rerun `dataset check`; a refusal leaves the run's last result alone."""
    written = load_settings(project).runs_dir / RUN / "separation.json"
    before = written.read_bytes() if written.exists() else None

    def refused(held: Path, *needles: str) -> str:
        result = run_cli("eval", RUN, "--config", project, "--held-out", held)
        assert_user_error(result, str(held), *needles)
        assert "dataset.path" not in result.stderr and "dataset check" not in result.stderr
        return result.stderr

    refused(tmp_path / "nowhere", "held-out folder not found", "--held-out")
    refused(project, "is not a folder", "--held-out")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "has no concept folders", "loraforge eval --held-out` again")
    (tmp_path / "bare" / "red_knight").mkdir(parents=True)
    refused(tmp_path / "bare", "does not start with a repeat count",
            "loraforge eval --held-out` again")
    # the training pictures themselves, or one copied under another name, are not held out
    dataset = load_settings(project).dataset_dir
    refused(dataset, "of the training pictures (e.g.", "would not be a held-out one",
            "kept out of training")
    (tmp_path / "copied" / "1_red_knight").mkdir(parents=True)
    trained = next((dataset / "1_red_knight").glob("*.png"))
    (tmp_path / "copied" / "1_red_knight" / "fresh.png").write_bytes(trained.read_bytes())
    refused(tmp_path / "copied", "holds 1 of the training pictures (e.g. ", "fresh.png is ")
    assert (written.read_bytes() if written.exists() else None) == before


def test_a_cut_lora_or_a_dataset_of_other_concepts_is_refused_before_measuring(
        project: Path, tmp_path: Path) -> None:
    """A truncated final LoRA ended in diffusers' OSError traceback after the models had
    loaded; a dataset folder replaced by other characters was measured with triggers the
    LoRA never learnt, and its separation.json overwritten."""
    import shutil

    run_dir = load_settings(project).runs_dir / RUN
    copy = tmp_path / "cut"
    shutil.copytree(run_dir, copy)
    final = copy / f"{RUN}.safetensors"
    final.write_bytes(final.read_bytes()[:5000])
    (copy / f"{RUN}.safetensors").rename(copy / "cut.safetensors")
    runs = load_settings(project).runs_dir
    shutil.move(copy, runs / "cut")
    try:
        assert_user_error(run_cli("eval", "cut", "--config", project), "cut.safetensors",
                          "is incomplete")
    finally:
        shutil.rmtree(runs / "cut")
    other = tmp_path / "other" / "10_green_elf"
    other.mkdir(parents=True)
    draw_character(other / "0.png", (30, 200, 30), "box", offset=0)
    written = run_dir / "separation.json"
    before = written.read_bytes() if written.exists() else None
    refused = run_cli("eval", RUN, "--config", project, "--set",
                      f"dataset.path={other.parent}")
    assert_user_error(refused, f"run `{RUN}` was not trained on the concept(s) green_elf",
                      "blue_mage, red_knight", "dataset.path")
    assert (written.read_bytes() if written.exists() else None) == before


def test_pictures_of_every_bucket_are_measured(tiny_store: Path, tmp_path: Path,
                                              one_torch_thread: None) -> None:
    """A concept with a square and a wide picture (two buckets at 128 px) is measured on both:
    the loss is the mean over every picture, and as each bucket draws its own fixed noise,
    each picture counts as it measures alone."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from loraforge.config import DatasetConfig
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.separation import concept_samples, trigger_losses

    base = tiny_store / "tiny-sd15"
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    alphas = DDPMScheduler.from_pretrained(base, subfolder="scheduler").alphas_cumprod
    hidden = torch.randn((1, 77, unet.config.cross_attention_dim),
                         generator=torch.Generator().manual_seed(0))
    config = DatasetConfig(resolution=128, min_bucket=64, max_bucket=256, bucket_step=32)

    def measured(*names: str) -> tuple[int, list[float]]:
        root = tmp_path / "-".join(names) / "1_red_knight"
        root.mkdir(parents=True)
        for name, size in (("square", (256, 256)), ("wide", (512, 128))):
            if name in names:
                draw_character(root / f"{name}.png", (210, 40, 30), "box", offset=5)
                Image.open(root / f"{name}.png").resize(size).save(root / f"{name}.png")
        (sample,) = concept_samples(vae, alphas, scan_dataset(root.parent, ".txt"), config,
                                    None, torch.device("cpu"))
        losses = trigger_losses(unet, lambda _prompt: hidden, [sample], [sample.trigger])
        return sample.images, losses["red_knight"][sample.trigger]

    (one, square), (_, wide), (both, losses) = (measured("square"), measured("wide"),
                                                measured("square", "wide"))
    assert (one, both) == (1, 2)
    assert losses == pytest.approx([(a + b) / 2 for a, b in zip(square, wide, strict=True)],
                                   abs=2e-6)
    assert square != pytest.approx(wide, abs=1e-4)


def test_margin_says_whether_the_own_trigger_wins() -> None:
    apart = ConceptSeparation("a", "ta", 2, False, {"ta": 0.5, "tb": 0.6, "tc": 0.55}, 0.9)
    assert apart.margin == pytest.approx(0.1) and apart.separated is True
    mixed = ConceptSeparation("a", "ta", 2, False, {"ta": 0.6, "tb": 0.5}, 0.9)
    assert mixed.margin < 0 and mixed.separated is False
    alone = ConceptSeparation("a", "ta", 2, False, {"ta": 0.6}, 0.9)
    assert alone.margin is None and alone.separated is None


def test_pair_separation_cancels_a_trigger_that_suits_every_image() -> None:
    def result(red: dict[str, float], blue: dict[str, float]) -> Separation:
        return Separation("r", "r.safetensors", [50], 1, [
            ConceptSeparation("red", "zqred", 4, False, red, 1.0),
            ConceptSeparation("blue", "zqblue", 4, False, blue, 1.0)])

    # "zqred" is the better prompt for every image: red looks separated, blue does not.
    biased = result({"zqred": 0.49, "zqblue": 0.50}, {"zqred": 0.59, "zqblue": 0.60})
    assert [c.separated for c in biased.concepts] == [True, False]
    assert biased.pairs() == [("red", "blue", pytest.approx(0.0))]
    apart = result({"zqred": 0.50, "zqblue": 0.52}, {"zqred": 0.63, "zqblue": 0.60})
    assert [c.separated for c in apart.concepts] == [True, True]
    assert apart.pairs() == [("red", "blue", pytest.approx(0.05 / 1.10))]


def test_eval_of_an_unfinished_run_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "Multi_Concept_Output" / "half"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "half", "status": "interrupted"}))
    result = run_cli("eval", "half", "--set", f"storage.root={tmp_path}", cwd=tmp_path)
    assert_user_error(result, "run `half` has not finished (status: interrupted)",
                      "loraforge train --run half")
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
    nothing = CliRunner().invoke(app, ["eval", "--set", f"storage.root={tmp_path}"])
    assert isinstance(nothing.exception, ForgeError)
    assert "no finished training run" in str(nothing.exception)


def test_concepts_sharing_a_trigger_are_named(tmp_path: Path) -> None:
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.separation import distinct_triggers

    for folder in ("2_blake", "2_mira", "2_sora"):
        (tmp_path / folder).mkdir()
        draw_character(tmp_path / folder / "0.png", (200, 30, 30), "box", offset=0)
    (tmp_path / "2_blake" / "0.txt").write_text("1girl, red hat")
    (tmp_path / "2_mira" / "0.txt").write_text("1girl, blue robe")
    with pytest.raises(ForgeError, match="blake and mira share the trigger `1girl`") as caught:
        distinct_triggers(scan_dataset(tmp_path, ".txt"))
    assert "put each concept's name in its captions" in str(caught.value.fix)
    (tmp_path / "2_mira" / "0.txt").write_text("mira, 1girl, blue robe")
    assert distinct_triggers(scan_dataset(tmp_path, ".txt")) == {
        "blake": "1girl", "mira": "mira", "sora": "sora"}


def test_a_trigger_before_the_keep_tokens_separator_is_the_trigger_alone(tmp_path: Path,
                                                                         ) -> None:
    """`blake ||| red hat` begins with the tag blake: eval's prompt is `blake`."""
    from loraforge.dataset.scan import scan_dataset
    from loraforge.train.separation import distinct_triggers

    (tmp_path / "2_blake").mkdir()
    draw_character(tmp_path / "2_blake" / "0.png", (200, 30, 30), "box", offset=0)
    (tmp_path / "2_blake" / "0.txt").write_text("blake ||| red hat, smile")
    assert distinct_triggers(scan_dataset(tmp_path, ".txt")) == {"blake": "blake"}


def test_eval_outside_a_project_says_there_is_no_forge_toml(tmp_path: Path) -> None:
    result = run_cli("eval", cwd=tmp_path)
    assert_user_error(result, "no finished training run", "there is no forge.toml in")


def _printed(result: Separation) -> str:
    from rich.console import Console

    from loraforge.train.separation import print_table

    console = Console(record=True, width=200)
    print_table(result, console)
    return console.export_text()


def test_a_margin_that_rounds_to_zero_shows_no_sign(tmp_path: Path) -> None:
    """`separation -0.00%` read as a (tiny) loss of separation; it is none either way."""
    from loraforge.report.html import write_report
    from loraforge.train.separation import write_separation

    result = Separation("r", "r.safetensors", [50], 1, [
        ConceptSeparation("red", "zqred", 4, False, {"zqred": 0.5, "zqblue": 0.499999}, 1.0),
        ConceptSeparation("blue", "zqblue", 4, False, {"zqred": 0.499999, "zqblue": 0.5}, 1.0)])
    printed = _printed(result)
    assert "-0.00%" not in printed and "separation 0.00%" in printed
    write_separation(tmp_path, result, 0o644)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "-0.00%" not in page and "red / blue: 0.00%" in page


def test_names_and_triggers_with_brackets_are_printed_as_written() -> None:
    """`10_[wip] mira` vanished from the table (read as a style); a trigger `[/x]` ended eval
    in rich's MarkupError."""
    result = Separation("r", "r.safetensors", [50], 1, [
        ConceptSeparation("[wip] mira", "[/x]", 4, False, {"[/x]": 0.5, "blake": 0.6}, 1.0),
        ConceptSeparation("blake", "blake", 4, False, {"[/x]": 0.6, "blake": 0.5}, 1.0)])
    printed = _printed(result)
    assert "[wip] mira" in printed and '"[/x]"' in printed


def test_eval_of_a_run_whose_record_is_damaged_names_the_damage(tmp_path: Path) -> None:
    """It said `has not finished (status: unknown)` and to rerun train, which refuses too."""
    run_dir = tmp_path / "Multi_Concept_Output" / "cut"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "fin')
    result = run_cli("eval", "cut", "--set", f"storage.root={tmp_path}", cwd=tmp_path)
    assert_user_error(result, "the run's record cannot be read (not JSON",
                      "restore run.json from a copy")
    assert "status: unknown" not in result.stderr


def test_eval_of_a_copied_run_folder_says_it_is_a_copy(tmp_path: Path) -> None:
    """It said `has not finished (status: finished)`: the copy's LoRA keeps the original's
    name, and eval looked for one named after the folder."""
    run_dir = tmp_path / "Multi_Concept_Output" / "mc_backup"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"name": "multi_concept",
                                                  "status": "finished"}))
    (run_dir / "multi_concept.safetensors").write_bytes(b"x" * 100)
    result = run_cli("eval", "mc_backup", "--set", f"storage.root={tmp_path}", cwd=tmp_path)
    assert_user_error(result, "run folder `mc_backup` is a copy (or a renaming) of run "
                      "`multi_concept`", "loraforge eval multi_concept", "mc_backup.safetensors")
    assert "has not finished" not in result.stderr
    (run_dir / "multi_concept.safetensors").unlink()
    result = run_cli("eval", "mc_backup", "--set", f"storage.root={tmp_path}", cwd=tmp_path)
    assert_user_error(result, "finished, but its final LoRA mc_backup.safetensors is missing",
                      "--restart")


def test_eval_on_pictures_the_run_never_saw_is_refused(project: Path, tmp_path: Path) -> None:
    """`--set dataset.path=OTHER` with the same concept folders measured the run on pictures
    it never saw, labelled "training, fresh noise"."""
    other = tmp_path / "other"
    for folder in ("1_red_knight", "1_blue_mage"):
        (other / folder).mkdir(parents=True)
        draw_character(other / folder / "0.png", (90, 200, 30), "box", offset=3)
        (other / folder / "0.txt").write_text(f"{folder[2:]}, solo")
    written = load_settings(project).runs_dir / RUN / "separation.json"
    before = written.read_bytes() if written.exists() else None
    refused = run_cli("eval", RUN, "--config", project, "--set", f"dataset.path={other}")
    assert_user_error(refused, f"2 picture(s) of {other} are not among the pictures run `{RUN}` "
                      "was trained on", "dataset.path = ", "--held-out")
    assert (written.read_bytes() if written.exists() else None) == before


def test_eval_says_which_base_model_it_measures_with(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's base model gone, eval silently measured with whatever models.base named."""
    from loraforge.models import store
    from loraforge.train.separation import _base_model

    record = {"base_model": str(tmp_path / "gone" / "sd15-anime")}
    monkeypatch.setattr(store, "resolve_base_model", lambda _settings: tmp_path / "sd15-real")
    with pytest.raises(ForgeError, match=r"models\.base names another one") as caught:
        _base_model(record, load_settings(None), "r")
    assert "gone/sd15-anime" in str(caught.value) and "models.base" in str(caught.value.fix)
    monkeypatch.setattr(store, "resolve_base_model", lambda _settings: tmp_path / "sd15-anime")
    base, notes = _base_model(record, load_settings(None), "r")
    assert base == tmp_path / "sd15-anime" and "is not there: measured with" in notes[0]
