"""forge.toml: init, defaults, overrides, resolved paths, and every malformed-config message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli


def _show(config: Path, *extra: str, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> dict:
    result = run_cli("config", "show", "--json", "--config", config, *extra, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_init_writes_config_and_dataset_folder_and_never_overwrites(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    first = run_cli("init", project)
    assert first.returncode == 0, first.stderr
    config = project / "forge.toml"
    readme = project / "master_dataset" / "README.md"
    assert config.is_file() and readme.is_file()
    assert "[train]" in config.read_text() and "# " in config.read_text()

    config.write_text("[train]\nepochs = 3\n")
    again = run_cli("init", project, "--tiny")
    assert again.returncode == 0
    assert "not overwritten" in again.stdout
    assert config.read_text() == "[train]\nepochs = 3\n"


def test_init_where_no_folder_can_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    result = run_cli("init", tmp_path / "afile" / "project")
    assert_user_error(result, "afile/project", "cannot create the project folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_init_checks_before_writing_and_names_a_broken_link(tmp_path: Path) -> None:
    """A file where master_dataset/ goes left a half-made project (forge.toml written, then
    "File exists"); a broken link was "cannot create the project folder (File exists)"."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "master_dataset").write_text("mine")
    result = run_cli("init", project)
    assert_user_error(result, "p/master_dataset: is a file where the project's master_dataset/",
                      "move that file away")
    assert sorted(p.name for p in project.iterdir()) == ["master_dataset"]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone" / "deeper")
    result = run_cli("init", link)
    assert_user_error(result, "is a broken symbolic link", "gone/deeper",
                      "create the folder it points to")
    assert not (tmp_path / "gone").exists()


def test_written_config_holds_the_community_defaults(tmp_path: Path) -> None:
    run_cli("init", tmp_path)
    shown = _show(tmp_path / "forge.toml")["config"]
    train = shown["train"]
    assert shown["dataset"]["resolution"] == 512
    assert (train["epochs"], train["batch_size"]) == (10, 2)
    assert (train["unet_lr"], train["text_encoder_lr"]) == (5e-4, 1e-4)
    assert (train["network_dim"], train["network_alpha"]) == (16, 8)
    assert (train["min_snr_gamma"], train["clip_skip"], train["seed"]) == (5, 2, 42)
    assert train["lr_scheduler"] == "cosine_with_restarts"
    assert shown["models"]["base"] == "AnyLoRA"
    assert shown["slurm"]["partition"] == "c3_accel"


def test_tiny_init_selects_the_embedded_model(tmp_path: Path) -> None:
    run_cli("init", tmp_path, "--tiny")
    shown = _show(tmp_path / "forge.toml")
    assert shown["config"]["models"] == {"base": "tiny", "controlnet": "tiny", "tagger": "tiny",
                                         "detector": "tiny"}
    root = Path(shown["paths"]["storage_root"])
    assert shown["paths"]["base_model"] == str(root / "tiny-sd15")
    assert shown["paths"]["controlnet"] == str(root / "tiny-controlnet")
    assert shown["paths"]["tagger"] == str(root / "tiny-tagger")
    assert shown["paths"]["detector"] == str(root / "tiny-detector")
    shown = shown["config"]
    assert shown["train"]["optimizer"] == "AdamW"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "forge.toml").write_text('[storage]\nroot = "lab"\n[dataset]\npath = "data"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths = _show(project / "forge.toml", cwd=elsewhere)["paths"]
    assert paths["storage_root"] == str((project / "lab").resolve())
    assert paths["dataset"] == str((project / "data").resolve())
    assert paths["runs"] == str((project / "lab" / "Multi_Concept_Output").resolve())


def test_storage_root_environment_variable_wins(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text('[storage]\nroot = "lab"\n')
    other = tmp_path / "scratch"
    paths = _show(tmp_path / "forge.toml",
                  env={"LORAFORGE_STORAGE_ROOT": str(other)})["paths"]
    assert paths["storage_root"] == str(other.resolve())


def test_a_storage_root_variable_of_blanks_is_refused_not_made_a_folder(tmp_path: Path,
                                                                        ) -> None:
    (tmp_path / "forge.toml").write_text("")
    for command in (("config", "show"), ("runs",), ("models", "list")):
        result = run_cli(*command, "--config", tmp_path / "forge.toml", cwd=tmp_path,
                         env={"LORAFORGE_STORAGE_ROOT": "   "})
        assert_user_error(result, "LORAFORGE_STORAGE_ROOT is set to blanks",
                          "unset it to use storage.root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forge.toml"]


def test_set_overrides_the_file(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[train]\nepochs = 3\n")
    shown = _show(tmp_path / "forge.toml", "--set", "train.epochs=7",
                  "--set", "generate.prompt=two knights")["config"]
    assert shown["train"]["epochs"] == 7
    assert shown["generate"]["prompt"] == "two knights"


def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[train]\nunet_lrr = 1e-4\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "forge.toml", "unknown key `train.unet_lrr`",
                      "did you mean `train.unet_lr`?")


def test_a_size_key_points_to_width_and_height(tmp_path: Path) -> None:
    """`--size` and a scene's `size` exist, but [generate] has width and height: the nearest
    spelling was `generate.batch_size`, which led the user astray."""
    result = run_cli("config", "show", "--set", "generate.size=512x384", cwd=tmp_path)
    assert_user_error(result, "unknown key `generate.size`",
                      "did you mean `generate.width` and `generate.height`?")


def test_unknown_key_of_a_concept_table_suggests_the_concept_key(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[dataset.concepts.blue_mage]\nshufle_caption = false\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "unknown key `dataset.concepts.blue_mage.shufle_caption`",
                      "did you mean `dataset.concepts.blue_mage.shuffle_caption`?")


def test_unknown_optimizer_is_caught_when_the_config_is_read(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text('[train]\noptimizer = "adam8bit"\n')
    result = run_cli("dataset", "check", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "forge.toml", "`train.optimizer`", "did you mean AdamW8bit?")
    cut_short = run_cli("config", "show", "--set", "train.optimizer=adamw8", cwd=tmp_path)
    assert_user_error(cut_short, "did you mean AdamW8bit?")  # not AdamW, the nearer spelling
    (tmp_path / "forge.toml").write_text('[train]\noptimizer = "torch.optim.SGD"\n')
    assert run_cli("config", "show", "--config", tmp_path / "forge.toml").returncode == 0


def test_unknown_section_is_named(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[trian]\nepochs = 1\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "unknown key `trian`", "did you mean `train`?")


def test_malformed_toml_gives_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[train]\nepochs = 3\nunet_lr = = 5\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "forge.toml", "line 3", "column")


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text('[train]\nepochs = "ten"\n')
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "`train.epochs`", "'ten'")


def test_true_or_false_for_a_number_is_refused_not_read_as_one_or_zero(tmp_path: Path,
                                                                       ) -> None:
    (tmp_path / "forge.toml").write_text("[train]\nunet_lr = true\nmax_steps = false\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "forge.toml", "`train.unet_lr`: takes a number, not true",
                      "`train.max_steps`: takes a number, not false")
    result = run_cli("config", "show", "--set", "generate.steps=true")
    assert_user_error(result, "`--set generate.steps=true`: takes a number, not true")
    (tmp_path / "forge.toml").write_text("[train]\ncompile_unet = true\nunet_lr = 1\n")
    shown = _show(tmp_path / "forge.toml")["config"]["train"]  # true where a key takes it
    assert (shown["compile_unet"], shown["unet_lr"]) == (True, 1.0)


def test_out_of_range_value_names_the_key_and_limit(tmp_path: Path) -> None:
    (tmp_path / "forge.toml").write_text("[train]\nbatch_size = 0\n[dataset]\nresolution = 500\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "`train.batch_size`", "greater than or equal to 1",
                      "`dataset.resolution`", "multiple of 8")


def test_a_seed_beyond_what_torch_takes_is_refused_when_read(tmp_path: Path) -> None:
    too_big = "generate.seed=9223372036854775808"  # 2**63: a torch generator takes up to 2**63-1
    result = run_cli("config", "show", "--set", too_big)
    assert_user_error(result, f"`--set {too_big}`", "less than or equal to 9223372036854775807")
    (tmp_path / "forge.toml").write_text("[train]\nseed = 9223372036854775808\n")
    result = run_cli("config", "show", "--config", tmp_path / "forge.toml")
    assert_user_error(result, "`train.seed`", "less than or equal to 9223372036854775807")


def test_a_random_generate_seed_is_taken_in_the_config_as_on_the_command_line(
        tmp_path: Path) -> None:
    """`--seed -1` and a scene's `seed = -1` draw a random seed, but `generate.seed = -1` in
    forge.toml (or `--set generate.seed=-1`) was refused: "greater than or equal to 0"."""
    run_cli("init", tmp_path)
    config = tmp_path / "forge.toml"
    written = config.read_text()
    assert "-1 draws a random one each time.\nseed = 42\n" in written
    config.write_text(written.replace("each time.\nseed = 42\n", "each time.\nseed = -1\n"))
    assert _show(config)["config"]["generate"]["seed"] == -1
    assert _show(config, "--set", "generate.seed=-1")["config"]["generate"]["seed"] == -1
    result = run_cli("config", "show", "--config", config, "--set", "generate.seed=-2")
    assert_user_error(result, "`--set generate.seed=-2`", "greater than or equal to -1")


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("config", "show", "--config", tmp_path / "nope.toml")
    assert_user_error(result, "nope.toml", "not found", "loraforge init")


def test_malformed_override_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("config", "show", "--set", "epochs")
    assert_user_error(result, "`epochs`", "key=value")
    result = run_cli("config", "show", "--set", "train.epochs=0")
    assert_user_error(result, "`--set train.epochs=0`", "greater than or equal to 1",
                      "fix: correct the value(s) named above on the command line")  # no file


def test_bad_override_is_named_not_the_file_it_overrides(tmp_path: Path) -> None:
    config = tmp_path / "forge.toml"
    config.write_text("[train]\nepochs = 3\n")
    result = run_cli("config", "show", "--config", config, "--set", "generate.steps=0")
    assert_user_error(result, "`--set generate.steps=0`", "greater than or equal to 1")
    assert str(config) not in result.stdout + result.stderr
    config.write_text("[train]\nepochs = 0\n")
    result = run_cli("config", "show", "--config", config, "--set", "generate.steps=0")
    assert_user_error(result, str(config), "`train.epochs`", "`--set generate.steps=0`")
    result = run_cli("config", "show", "--config", config, "--set", "train.epochz=3")
    assert_user_error(result, "unknown key `train.epochz` (--set train.epochz=3)",
                      "did you mean `train.epochs`?")


def test_cli_help_imports_no_heavy_library() -> None:
    code = ("import sys; from loraforge.cli import app; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft') "
            "if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
    help_text = run_cli("--help").stdout
    for command in ("init", "config", "models", "dataset"):
        assert command in help_text


def test_model_and_compile_caches_live_under_the_storage_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    from loraforge.config import load_settings
    from loraforge.runtime import go_offline

    for name in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "forge.toml").write_text('[storage]\nroot = "lab"\n')
    settings = load_settings(tmp_path / "forge.toml")
    go_offline(settings)
    lab = tmp_path / "lab"
    assert Path(os.environ["HF_HOME"]).is_relative_to(lab)
    assert Path(cache_dir()).is_relative_to(lab)
    assert Path(triton_cache_dir(0)).is_relative_to(lab)


def test_config_show_prints_a_config_that_reads_back_with_any_concept_name(
        tmp_path: Path) -> None:
    """Concept folders such as `10_blake v2` or `10_mira.alt` were shown as
    `[dataset.concepts.blake v2]` (not TOML) and `[dataset.concepts.mira.alt]` (a concept
    `mira` holding a table `alt`), so the output fed back with --config failed."""
    from loraforge.config import load_settings

    config = tmp_path / "forge.toml"
    config.write_text('[dataset.concepts."blake v2"]\nkeep_tokens = 2\n'
                      '[dataset.concepts."mira.alt"]\nflip_aug = true\n'
                      '[train.optimizer_args]\n"d.coef" = 0.5\n')
    shown = run_cli("config", "show", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert '[dataset.concepts."blake v2"]' in shown.stdout
    (tmp_path / "shown.toml").write_text(shown.stdout)
    again = load_settings(tmp_path / "shown.toml").to_dict()
    assert again["dataset"]["concepts"] == load_settings(config).to_dict()["dataset"]["concepts"]
    assert again["train"]["optimizer_args"] == {"d.coef": 0.5}


def test_config_show_prints_a_prompt_with_an_emoji_as_toml_that_reads_back(
        tmp_path: Path) -> None:
    """An emoji was written as JSON's "\\ud83d\\udde1", which TOML refuses: the shown config
    fed back with --config failed with "not a Unicode scalar value"."""
    from loraforge.config import load_settings

    shown = run_cli("config", "show", "--set", "generate.prompt=a knight 🗡, é", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    (tmp_path / "shown.toml").write_text(shown.stdout)
    again = load_settings(tmp_path / "shown.toml").to_dict()
    assert again["generate"]["prompt"] == "a knight 🗡, é"


def test_init_keeps_a_forge_toml_that_is_a_link_to_nothing(tmp_path: Path) -> None:
    """A forge.toml linking to a config not there (a share not mounted) was replaced by a new
    default one, though init "never overwrites a file"."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "forge.toml").symlink_to(tmp_path / "share" / "forge.toml")
    result = run_cli("init", project)
    assert_user_error(result, "forge.toml: is a broken symbolic link", "share/forge.toml",
                      "restore the file it points to")
    assert (project / "forge.toml").is_symlink()
    assert sorted(p.name for p in project.iterdir()) == ["forge.toml"]


def test_init_tiny_on_a_kept_forge_toml_says_tiny_was_not_applied(tmp_path: Path) -> None:
    """It exited 0 saying only "kept", and the project went on with the full-size models."""
    from loraforge.project import init_project

    (tmp_path / "forge.toml").write_text("[train]\nepochs = 3\n")
    said = "\n".join(init_project(tmp_path, tiny=True))
    assert "--tiny was not applied" in said and 'detector to "tiny" in its [models]' in said
    assert (tmp_path / "forge.toml").read_text() == "[train]\nepochs = 3\n"
    # a rerun (of init --tiny, or of the demo) on the config it wrote says nothing of the kind
    again = tmp_path / "again"
    init_project(again, tiny=True)
    said = "\n".join(init_project(again, tiny=True))
    assert "kept" in said and "--tiny was not applied" not in said


def test_set_keeps_a_number_as_text_for_a_key_that_takes_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set slurm.account=1234` (numeric accounts are common) and `--set
    train.run_name=2024` failed with "Input should be a valid string", and nothing said how
    to write them; numbers and truths for the other keys must still be read as such."""
    from loraforge.config import load_settings

    monkeypatch.chdir(tmp_path)
    config = load_settings(None, ["slurm.account=1234", "train.run_name=2024",
                                  'slurm.qos="0042"', "generate.prompt=true",
                                  "train.epochs=5", "train.channels_last=true",
                                  "slurm.gpus_per_node=2"]).config
    assert (config.slurm.account, config.train.run_name, config.slurm.qos) == (
        "1234", "2024", "0042")
    assert config.generate.prompt == "true"
    assert (config.train.epochs, config.train.channels_last, config.slurm.gpus_per_node) == (
        5, True, 2)


def test_a_storage_root_of_blanks_in_set_or_the_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set 'storage.root=" "'` made (and filled) a folder named with a space, which
    LORAFORGE_STORAGE_ROOT of blanks is refused for."""
    from loraforge.config import load_settings
    from loraforge.errors import ForgeError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ForgeError, match=r"storage\.root=\" \"`: is blanks \(' '\), not a "
                                         r"folder") as refused:
        load_settings(None, ['storage.root=" "'])
    assert refused.value.path is None  # the --set is named, not a file
    (tmp_path / "forge.toml").write_text('[storage]\nroot = "  "\n')
    with pytest.raises(ForgeError, match=r"storage\.root`: is blanks"):
        load_settings(None)
