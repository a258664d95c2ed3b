"""`loraforge models import`: single-file checkpoints in SD's original (LDM) layout, written here
from the tiny model, come back as diffusers folders with every tensor equal; pickles are opened
only with weights_only=True; other families are refused; the result trains and renders offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_user_error, run_cli, write_training_project
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loraforge.errors import ForgeError
from loraforge.models.command import models_app

# --- diffusers -> original layout (what A1111 and Civitai files use) ------------------------

Pairs = list[tuple[str, str, dict[str, str] | None]]
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def unet_pairs() -> Pairs:
    pairs: Pairs = [("time_embedding.linear_1.", "time_embed.0.", None),
                    ("time_embedding.linear_2.", "time_embed.2.", None),
                    ("conv_in.", "input_blocks.0.0.", None), ("conv_norm_out.", "out.0.", None),
                    ("conv_out.", "out.2.", None),
                    ("mid_block.resnets.0.", "middle_block.0.", RESNET),
                    ("mid_block.attentions.0.", "middle_block.1.", None),
                    ("mid_block.resnets.1.", "middle_block.2.", RESNET)]
    for i in range(4):
        for j in range(2):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.",
                       None)]
        for j in range(3):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", None)]
        if i < 3:
            up = f"output_blocks.{3 * i + 2}.{2 if i else 1}."
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * i + 3}.0.op.",
                       None), (f"up_blocks.{i}.upsamplers.0.", up, None)]
    return pairs


def vae_pairs() -> Pairs:
    pairs: Pairs = []
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_norm_out.", f"{side}.norm_out.", None),
                  (f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", VAE_RESNET),
                  (f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", VAE_RESNET),
                  (f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", VAE_ATTN)]
    for i in range(4):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                   VAE_RESNET) for j in range(2)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.",
                   VAE_RESNET) for j in range(3)]
        if i < 3:
            pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.",
                       None),
                      (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.",
                       None)]
    return pairs


def controlnet_pairs(blocks: int) -> Pairs:
    pairs = [p for p in unet_pairs() if not p[0].startswith(("up_blocks.", "conv_norm_out.",
                                                             "conv_out."))]
    pairs += [("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", None),
              ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * blocks + 2}.", None),
              ("controlnet_mid_block.", "middle_block_out.0.", None)]
    pairs += [(f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * k + 2}.", None)
              for k in range(blocks)]
    pairs += [(f"controlnet_down_blocks.{k}.", f"zero_convs.{k}.0.", None) for k in range(12)]
    return pairs


def ldm_name(key: str, pairs: Pairs) -> str:
    for old, new, inner in pairs:
        if key.startswith(old):
            rest = key[len(old):]
            if inner is not None:
                head, _, tail = rest.partition(".")
                rest = f"{inner[head]}.{tail}".replace("proj_out.0.", "proj_out.")
            return new + rest
    return key  # the same name in both layouts


def to_ldm(unet: dict[str, Any], vae: dict[str, Any] | None, text: dict[str, Any],
           ) -> dict[str, Any]:
    out = {"model.diffusion_model." + ldm_name(k, unet_pairs()): v for k, v in unet.items()}
    out.update(vae_to_ldm(vae or {}, "first_stage_model."))
    out.update({"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()})
    return out


def vae_to_ldm(vae: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in vae.items():
        name = ldm_name(key, vae_pairs())
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # 1x1 convolutions in the original
        out[prefix + name] = value
    return out


def controlnet_to_ldm(cn: dict[str, Any]) -> dict[str, Any]:
    blocks = len({k.split(".")[2] for k in cn if k.startswith("controlnet_cond_embedding.blocks.")})
    return {"control_model." + ldm_name(k, controlnet_pairs(blocks)): v for k, v in cn.items()}


# --- fixtures --------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def parts(tiny_store: Path) -> dict[str, dict[str, torch.Tensor]]:
    base = tiny_store / "tiny-sd15"
    return {"unet": load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors")),
            "vae": load_file(str(base / "vae" / "diffusion_pytorch_model.safetensors")),
            "text_encoder": load_file(str(base / "text_encoder" / "model.safetensors")),
            "controlnet": load_file(str(tiny_store / "tiny-controlnet" /
                                        "diffusion_pytorch_model.safetensors"))}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory,
          parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Path]:
    """Single files as Civitai hands them out."""
    folder = tmp_path_factory.mktemp("downloads")
    full = to_ldm(parts["unet"], parts["vae"], parts["text_encoder"])
    paths = {"full": folder / "tinyAnime_v10.safetensors",
             "novae": folder / "tinyAnime_noVae_fp16.ckpt",
             "vae": folder / "tiny-vae-ft-mse.safetensors",
             "controlnet": folder / "control_tiny_openpose.safetensors"}
    save_file(full, str(paths["full"]), metadata={"format": "pt"})
    novae = {k: v.half() for k, v in to_ldm(parts["unet"], None, parts["text_encoder"]).items()}
    torch.save({"state_dict": novae, "global_step": 470000, "epoch": 6}, paths["novae"])
    save_file(vae_to_ldm(parts["vae"], ""), str(paths["vae"]))
    save_file(controlnet_to_ldm(parts["controlnet"]), str(paths["controlnet"]))
    return paths


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "store"
    monkeypatch.setenv("LORAFORGE_STORAGE_ROOT", str(root))
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HOME",
                   "HF_HUB_DISABLE_TELEMETRY", "HF_DATASETS_OFFLINE"):  # import sets them
        monkeypatch.setenv(switch, os.environ.get(switch, ""))
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(models_app, [str(a) for a in args])


def refused(*args: str | Path) -> str:
    result = invoke(*args)
    assert isinstance(result.exception, ForgeError), (result.output, result.exception)
    return str(result.exception)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same(folder: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    got = load_file(str(folder))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == dtype, key
        assert torch.equal(got[key], value.to(dtype)), key


# --- tests -----------------------------------------------------------------------------------


def test_import_gives_back_every_tensor_offline(store: Path, files: dict[str, Path],
                                                parts: dict[str, dict[str, torch.Tensor]],
                                                no_network: None) -> None:
    result = invoke("import", files["full"], "--as", "base")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "recognised: embedded tiny checkpoint, float32" in result.output
    assert 'models.base = "tinyAnime_v10"' in result.output
    model = store / "tinyAnime_v10"
    assert_same(model / "unet" / "diffusion_pytorch_model.safetensors", parts["unet"],
                torch.float32)
    assert_same(model / "vae" / "diffusion_pytorch_model.safetensors", parts["vae"],
                torch.float32)
    assert_same(model / "text_encoder" / "model.safetensors", parts["text_encoder"],
                torch.float32)
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert {p.name for p in (model / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in model.rglob("*") if p.is_file())

    manifest = json.loads((model / "manifest.json").read_text())
    digest = sha(files["full"])
    assert manifest["kind"] == "base"
    assert manifest["source"]["sha256"] == digest
    assert manifest["source"]["short_hash"] == digest[:10]
    assert manifest["source"]["file"] == files["full"].name
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha(model / name), name

    listing = invoke("list")
    line = next(line for line in listing.output.splitlines() if line.startswith("tinyAnime"))
    assert digest[:10] in line and "import of tinyAnime_v10.safetensors" in line
    assert invoke("verify", "tinyAnime_v10").exit_code == 0

    message = refused("import", files["full"], "--as", "base")  # never overwritten
    assert "already exists" in message and "--name" in message
    assert not list(store.glob(".tinyAnime_v10.*.partial"))


def test_novae_checkpoint_needs_vae_and_pickles_load_weights_only(
        store: Path, files: dict[str, Path], parts: dict[str, dict[str, torch.Tensor]]) -> None:
    message = refused("import", files["novae"], "--as", "base")
    assert "noVAE" in message and "--vae" in message
    assert not store.exists() or not any(store.iterdir())

    result = invoke("import", files["novae"], "--as", "base", "--vae", files["vae"],
                    "--name", "anime")
    assert result.exit_code == 0, (result.output, result.exception)
    model = store / "anime"
    assert_same(model / "unet" / "diffusion_pytorch_model.safetensors", parts["unet"],
                torch.float16)  # the file's precision is kept
    assert_same(model / "text_encoder" / "model.safetensors", parts["text_encoder"],
                torch.float16)
    assert_same(model / "vae" / "diffusion_pytorch_model.safetensors", parts["vae"],
                torch.float32)  # the VAE file's tensors, in its precision
    source = json.loads((model / "manifest.json").read_text())["source"]
    assert source["format"] == "pickle (weights_only)"
    assert source["vae"]["sha256"] == sha(files["vae"])

    # --vae also checks what it is given.
    assert "is a checkpoint, not a VAE" in refused(
        "import", files["novae"], "--as", "base", "--vae", files["full"], "--name", "x")
    assert "is a VAE, not a model" in refused("import", files["vae"], "--as", "base")
    diffusers_vae = files["vae"].with_name("diffusion_pytorch_model.safetensors")
    save_file(parts["vae"], str(diffusers_vae))  # sd-vae-ft-mse as the diffusers repo has it
    message = refused("import", files["novae"], "--as", "base", "--vae", diffusers_vae,
                      "--name", "x")
    assert "is a VAE in the diffusers layout" in message and "single-file release" in message


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious .ckpt does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(store: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "free_model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
                "callback": Payload(marker)}, evil)
    assert b"system" in evil.read_bytes()  # the payload is really in there
    message = refused("import", evil, "--as", "base")
    assert "cannot be opened safely" in message and "system" in message
    assert "weights_only=True" in message and ".safetensors" in message
    assert not marker.exists()
    assert not store.exists() or not any(store.iterdir())


def _fake(path: Path, tensors: dict[str, tuple[int, ...]],
          metadata: dict[str, str] | None = None) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path), metadata)
    return path


def test_other_families_and_files_are_refused(store: Path, tmp_path: Path,
                                              files: dict[str, Path],
                                              parts: dict[str, dict[str, torch.Tensor]]) -> None:
    unet = "model.diffusion_model."
    sdxl = _fake(tmp_path / "ponyXL.safetensors", {
        f"{unet}input_blocks.0.0.weight": (8, 4, 3, 3), f"{unet}label_emb.0.0.weight": (8, 16),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,)})
    assert "SDXL" in refused("import", sdxl, "--as", "base")
    sd2 = _fake(tmp_path / "sd21.safetensors", {
        f"{unet}input_blocks.0.0.weight": (16, 4, 3, 3),
        f"{unet}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (16, 1024),
        "cond_stage_model.model.token_embedding.weight": (8, 4)})
    assert "SD 2.x" in refused("import", sd2, "--as", "base")

    tensors = load_file(str(files["full"]))
    vpred = tmp_path / "vpred.safetensors"
    save_file({**tensors, "v_pred": torch.zeros(1)}, str(vpred))
    assert "v-prediction" in refused("import", vpred, "--as", "base")
    shutil.copy(files["full"], tmp_path / "zsnr.safetensors")
    (tmp_path / "zsnr.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert "zsnr.yaml beside it sets parameterization: v" in refused(
        "import", tmp_path / "zsnr.safetensors", "--as", "base")
    inpaint = tmp_path / "inpainting.safetensors"
    save_file({**tensors, f"{unet}input_blocks.0.0.weight": torch.zeros(16, 9, 3, 3)},
              str(inpaint))
    assert "inpainting" in refused("import", inpaint, "--as", "base")
    text = "cond_stage_model.transformer.text_model."
    positions = tensors[f"{text}embeddings.position_embedding.weight"]
    longclip = tmp_path / "longclip.safetensors"  # Long-CLIP: 248 token positions
    save_file({**tensors, f"{text}embeddings.position_embedding.weight":
               torch.cat([positions, positions[-1:].repeat(171, 1)])}, str(longclip))
    assert f"{longclip}: its text encoder has 248 token positions; an embedded tiny base has " \
           "77" in refused("import", longclip, "--as", "base")
    wide = tmp_path / "wide_mlp.safetensors"
    fc1 = f"{text}encoder.layers.3.mlp.fc1.weight"
    save_file({**tensors, fc1: torch.zeros(96, tensors[fc1].shape[1])}, str(wide))
    assert f"{wide}: has a text encoder of another shape (encoder.layers.3.mlp.fc1.weight is " \
           "[96, 32]; embedded tiny has [64, 32])" in refused("import", wide, "--as", "base")

    lora = _fake(tmp_path / "char.safetensors",
                 {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 16)})
    assert "is a LoRA" in refused("import", lora, "--as", "base")
    assert "--as controlnet" in refused("import", files["controlnet"], "--as", "base")
    assert "--as base" in refused("import", files["full"], "--as", "controlnet")
    broken = tmp_path / "half.safetensors"
    broken.write_bytes(files["full"].read_bytes()[:5000])
    assert "not a readable .safetensors" in refused("import", broken, "--as", "base")
    assert "not a usable model name" in refused("import", files["full"], "--as", "base",
                                                "--name", "../x")
    for taken in ("runtimes", "cache", "Final_Images", "Tiny"):  # folders of the root's own
        assert f"`{taken}` is a reserved name" in refused("import", files["full"], "--as",
                                                          "base", "--name", taken)
    # the embedded tiny models' folders: `models tiny` (or the demo) replaced such an import
    for taken in ("tiny-controlnet", "tiny-sd15", "tiny-detector", "tiny-taught"):
        message = refused("import", files["controlnet"], "--as", "controlnet", "--name", taken)
        assert f"`{taken}` is the folder of an embedded tiny model" in message
        assert f"--name {taken}-imported" in message
    assert not store.exists() or not any(store.iterdir())


def test_controlnet_import_gives_back_every_tensor(
        store: Path, files: dict[str, Path], parts: dict[str, dict[str, torch.Tensor]],
        tiny_store: Path) -> None:
    result = invoke("import", files["controlnet"], "--as", "controlnet", "--name", "pose",
                    "--set", "storage.file_mode=0664")  # lab storage shared with a group
    assert result.exit_code == 0, (result.output, result.exception)
    modes = {p.stat().st_mode & 0o777 for p in (store / "pose").rglob("*")}
    assert modes == {0o664} and (store / "pose").stat().st_mode & 0o777 == 0o775
    assert_same(store / "pose" / "diffusion_pytorch_model.safetensors", parts["controlnet"],
                torch.float32)
    config = json.loads((store / "pose" / "config.json").read_text())
    reference = json.loads((tiny_store / "tiny-controlnet" / "config.json").read_text())
    for key in ("conditioning_embedding_out_channels", "block_out_channels",
                "cross_attention_dim", "norm_num_groups", "attention_head_dim"):
        assert config[key] == reference[key], key


def test_a_storage_root_that_is_a_file_is_named_not_a_traceback(
        store: Path, files: dict[str, Path]) -> None:
    """Its lock folder could not be made: a FileExistsError traceback after reading the file."""
    store.write_text("not a folder\n")
    message = refused("import", files["controlnet"], "--as", "controlnet", "--name", "pose")
    assert "cannot be created" in message and "storage root is a folder" in message
    assert store.read_text() == "not a folder\n"


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".partial", ".old")))


def test_an_import_onto_a_full_disk_is_one_message_and_leaves_no_partial(
        files: dict[str, Path], small_disk: Callable[[str], Path], tmp_path: Path) -> None:
    """It ended in a traceback (`Exception: No space left on device` from the tokenizer's
    save, or safetensors' SafetensorError), by the size of the disk."""
    for size in ("2m", "10m"):  # the first file written fails; the tokenizer's
        root = small_disk(size) / "store"
        result = run_cli("models", "import", files["full"], "--as", "base", cwd=tmp_path,
                         env={"LORAFORGE_STORAGE_ROOT": str(root)})
        assert_user_error(result, f"{root}: could not write the model `tinyAnime_v10`",
                          "No space left on device", "free space",
                          "half-written copy was removed")
        assert "SafetensorError" not in result.stderr
        assert not (root / "tinyAnime_v10").exists()
        assert _hidden(root) == [], size


def _blocks(path: Path) -> int:
    """Bytes `path` takes on the disk (0: a folder, or a file the import has just renamed or
    removed while it was looked at)."""
    try:
        return path.lstat().st_blocks * 512 if path.is_file() else 0
    except FileNotFoundError:
        return 0


def test_a_killed_import_leaves_no_partial_that_fills_the_disk_on_the_rerun(
        files: dict[str, Path], small_disk: Callable[[str], Path], tmp_path: Path) -> None:
    """SIGKILL (a job's memory limit, `kill -9`) mid-conversion left a hidden partial folder
    the size of the model, which the rerun removed only after 6 hours: on a disk with room
    for one copy, the rerun failed for want of space. The rerun holds the import's lock for
    that name: no other import of it runs, and a partial of another one is kept."""
    root = small_disk("26m") / "store"  # the converted model takes 22 MB
    env = {"LORAFORGE_STORAGE_ROOT": str(root)}
    root.mkdir()
    # a running import of another name (its lock held), and a fresh partial folder of this
    # name that is not an import's (a fetch's): neither is this rerun's to remove
    other = root / ".tinyAnime_v10.v2.k3x9a0q1.import.partial"
    fetching = root / ".tinyAnime_v10.m4b8c2d7.partial"
    for folder in (other, fetching):
        folder.mkdir()
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text("{}\n")
    import fcntl

    with open(root / ".tinyAnime_v10.v2.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        process = subprocess.Popen(
            [sys.executable, "-m", "loraforge", "models", "import", str(files["full"]), "--as",
             "base"], cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and process.poll() is None:
                partials = [p for p in root.glob(".tinyAnime_v10.*.partial")
                            if p not in (other, fetching)]
                written = sum(_blocks(f) for p in partials for f in p.rglob("*"))
                if written > 7_000_000:  # with the 22 MB of the rerun's: more than the disk
                    process.kill()
                    break
                time.sleep(0.002)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL, "the import ended before it was killed"
        killed = [p for p in root.glob(".tinyAnime_v10.*.partial") if p not in (other, fetching)]
        assert len(killed) == 1 and not (root / "tinyAnime_v10").exists()

        rerun = run_cli("models", "import", files["full"], "--as", "base", cwd=tmp_path, env=env)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert (root / "tinyAnime_v10" / "manifest.json").is_file()
        assert not killed[0].exists()
        assert _hidden(root) == sorted([other.name, fetching.name])
        assert (other / "unet" / "config.json").is_file()


SITECUSTOMIZE = '''
import os, socket
_log = os.environ["NET_ATTEMPTS_LOG"]
def _refuse(kind, where):
    with open(_log, "a") as fh:
        fh.write(f"{kind} {where!r}\\n")
    raise OSError(101, "network is unreachable (blocked by the test)")
_connect = socket.socket.connect
def connect(self, address):
    if self.family != socket.AF_UNIX:
        _refuse("connect", address)
    return _connect(self, address)
socket.socket.connect = connect
socket.socket.connect_ex = connect
socket.create_connection = lambda address, *a, **k: _refuse("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: _refuse("getaddrinfo", host)
'''


def offline_cli(*args: str | Path, guard: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`loraforge ARGS` where the network is impossible: a network namespace without any
    interface where we may create one, and in any case a socket layer that refuses (and logs)
    every connection and name lookup. HF_HUB_OFFLINE is not set by us: the command must."""
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORAFORGE_"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(guard), env.get("PYTHONPATH", "")]),
                "NET_ATTEMPTS_LOG": str(guard / "attempts.log"), "OMP_NUM_THREADS": "1",
                "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
                "HOME": str(guard)})
    prefix: list[str] = []
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"],
                                                  capture_output=True).returncode == 0:
        prefix = ["unshare", "-n"]
    return subprocess.run([*prefix, sys.executable, "-m", "loraforge", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_imported_model_trains_and_renders_without_network(
        store: Path, files: dict[str, Path], tiny_store: Path, tmp_path: Path) -> None:
    result = run_cli("models", "import", files["full"], "--as", "base", "--name", "imported",
                     env={"LORAFORGE_STORAGE_ROOT": str(store)})
    assert result.returncode == 0, result.stdout + result.stderr
    # transformers' advice to install torchvision (which would replace the pinned torch)
    assert "torchvision" not in result.stderr, result.stderr
    project = tmp_path / "project"
    config = write_training_project(project, tiny_store, {"max_steps": 2, "epochs": 1})
    text = config.read_text().replace(f'base = "{tiny_store / "tiny-sd15"}"',
                                      f'base = "{store / "imported"}"')
    config.write_text(text.replace('root = "store"', f'root = "{store}"'))
    guard = tmp_path / "guard"

    trained = offline_cli("train", "--config", config, guard=guard, cwd=project)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    lora = store / "Multi_Concept_Output" / "multi_concept" / "multi_concept.safetensors"
    assert lora.is_file()
    rendered = offline_cli("generate", "--config", config, "--steps", "2", "--size", "96x96",
                           "--pose", "random", "--figures", "1", guard=guard, cwd=project)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert (store / "Final_Images" / "final_command_scene.png").is_file()
    # Named by the checkpoint's own hashes, as A1111 and Civitai name it; they named the U-Net
    # file of its conversion, which no one else has
    checkpoint = files["full"].read_bytes()
    sha = hashlib.sha256(checkpoint).hexdigest()
    legacy = hashlib.sha256(checkpoint[0x100000:0x110000]).hexdigest()[:8] \
        if len(checkpoint) > 0x110000 else ""
    with safe_open(lora, "pt") as fh:
        meta = fh.metadata()
    assert (meta["ss_new_sd_model_hash"], meta["ss_sd_model_hash"]) == (sha, legacy)
    with Image.open(store / "Final_Images" / "final_command_scene.png") as image:
        assert f"Model hash: {sha[:10]}, Model: imported," in image.text["parameters"]
    attempts = guard / "attempts.log"
    assert not attempts.exists(), attempts.read_text()
