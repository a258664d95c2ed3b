"""`loraforge models fetch` against a local stand-in for the Hugging Face Hub.

The stand-in answers the calls huggingface_hub 2.4 makes: `GET /api/models/{repo}/revision/{rev}`
(with `blobs=true`: sizes, git blob ids, LFS sha256), `HEAD /{repo}/resolve/{commit}/{path}`
(X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size; LFS files redirect to another host, as the
Hub's CDN does, so the token must not follow) and ranged `GET`s of the file bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from conftest import draw_character, run_cli

from loraforge.errors import ForgeError

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
COMMITS = {"Lykon/AnyLoRA": "a" * 40, "lllyasviel/control_v11p_sd15_openpose": "b" * 40,
           "lllyasviel/Annotators": "c" * 40, "SmilingWolf/wd-vit-tagger-v3": "d" * 40}


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving repositories the way the Hub does."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Logged] = []
        self.drop_after: dict[str, int] = {}  # file sha256 -> bytes sent before the first drop
        self.fail_after_drop: set[str] = set()  # ... and then answer 503 to later requests
        self.dropped: set[str] = set()
        self.on_download: Callable[[], None] | None = None  # runs before each file is sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo: str, files: dict[str, bytes], lfs_suffixes: tuple[str, ...] = (
            ".safetensors", ".pth", ".bin", ".ckpt", ".png")) -> None:
        lfs = {p for p in files if p.endswith(lfs_suffixes)}
        self.repos[repo] = Repo(COMMITS[repo], files, lfs)

    def requests(self, method: str | None = None, contains: str = "") -> list[Logged]:
        return [r for r in self.log if (method is None or r.method == method)
                and contains in r.path]

    # -- serving ---------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(req.path)
        path = unquote(url.path)
        self.log.append(Logged("HEAD" if head else "GET", path,
                               {k.lower(): v for k, v in req.headers.items()}))
        if path.startswith("/api/models/"):
            return self.info(req, path[len("/api/models/"):])
        if path.startswith("/cdn/"):
            return self.cdn(req, path[len("/cdn/"):], head)
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(req, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self.reply(req, 404, b"not found", head)

    def info(self, req: BaseHTTPRequestHandler, rest: str) -> None:
        repo_id, _, revision = rest.partition("/revision/")
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.reply(req, 401, b'{"error":"Repository not found"}', False,
                              {"X-Error-Code": "RepoNotFound"})
        if revision not in ("main", repo.commit):
            return self.reply(req, 404, b'{"error":"Invalid rev id"}', False,
                              {"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for name, data in sorted(repo.files.items()):
            entry: dict[str, Any] = {"rfilename": name, "size": len(data),
                                     "blobId": git_blob_id(data)}
            if name in repo.lfs:
                entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                "pointerSize": 134}
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": siblings,
                           "private": False}).encode()
        self.reply(req, 200, body, False, {"Content-Type": "application/json"})

    def resolve(self, req: BaseHTTPRequestHandler, repo_id: str, revision: str, name: str,
                head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None or revision not in ("main", repo.commit) or name not in repo.files:
            return self.reply(req, 404, b"", head, {"X-Error-Code": "EntryNotFound",
                                                    "X-Repo-Commit": COMMITS.get(repo_id, "")})
        data = repo.files[name]
        common = {"X-Repo-Commit": repo.commit}
        if name in repo.lfs:  # the Hub answers with a redirect to its CDN (another host)
            sha = hashlib.sha256(data).hexdigest()
            return self.reply(req, 302, b"", head, {
                **common, "Location": f"http://localhost:{self.port}/cdn/{sha}?signed=1",
                "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_id(data)}"'})
        self.reply(req, 200, data, head, {**common, "ETag": f'"{git_blob_id(data)}"'})

    def cdn(self, req: BaseHTTPRequestHandler, sha: str, head: bool) -> None:
        data = next((d for r in self.repos.values() for d in r.files.values()
                     if hashlib.sha256(d).hexdigest() == sha), None)
        if data is None:
            return self.reply(req, 404, b"", head)
        if not head and self.on_download is not None:
            self.on_download()
        if not head and sha in self.dropped and sha in self.fail_after_drop:
            return self.reply(req, 503, b"busy", head)
        start, status, extra = 0, 200, {"Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
        ranged = req.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            start = int(ranged[len("bytes="):].split("-")[0])
            status = 206
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not head and sha in self.drop_after and sha not in self.dropped:
            self.dropped.add(sha)
            req.send_response(status)
            for key, value in extra.items():
                req.send_header(key, value)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body[: self.drop_after[sha]])
            req.wfile.flush()
            req.close_connection = True
            req.connection.shutdown(2)  # the connection dies mid-file
            return None
        self.reply(req, status, body, head, extra)

    def reply(self, req: BaseHTTPRequestHandler, status: int, body: bytes, head: bool,
              headers: dict[str, str] | None = None) -> None:
        req.send_response(status)
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fp16_bytes(path: Path) -> bytes:
    from safetensors.torch import load_file, save

    return save({k: v.half() for k, v in load_file(str(path)).items()})


def detector_pth(seed: int = 3) -> tuple[bytes, dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {"model0.conv1_1.weight": torch.randn(8, 3, 3, 3, generator=gen),
             "model0.conv1_1.bias": torch.randn(8, generator=gen),
             "model1_1.conv5_5_CPM_L1.weight": torch.randn(4, 8, 1, 1, generator=gen)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), state


@pytest.fixture(scope="module")
def served(tiny_store: Path) -> dict[str, dict[str, bytes]]:
    """The three repositories, laid out like the real ones, from the tiny model."""
    base, cn = tiny_store / "tiny-sd15", tiny_store / "tiny-controlnet"
    index = json.loads((base / "model_index.json").read_text())
    index.update({"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                  "feature_extractor": ["transformers", "CLIPImageProcessor"],
                  "requires_safety_checker": True})
    anylora = {
        "model_index.json": json.dumps(index).encode(),
        "README.md": b"AnyLoRA",
        "AnyLoRA_noVae_fp16-pruned.safetensors": os.urandom(4096),  # single-file: never fetched
        "safety_checker/config.json": b"{}",
        "safety_checker/model.fp16.safetensors": os.urandom(2048),
        "feature_extractor/preprocessor_config.json": b"{}",
        "unet/diffusion_pytorch_model.fp16.safetensors":
            fp16_bytes(base / "unet" / "diffusion_pytorch_model.safetensors"),
        "unet/diffusion_pytorch_model.safetensors":
            (base / "unet" / "diffusion_pytorch_model.safetensors").read_bytes(),
        "unet/diffusion_pytorch_model.bin": os.urandom(1024),
        "vae/diffusion_pytorch_model.safetensors":  # no fp16 variant: full precision instead
            (base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes(),
        "text_encoder/model.fp16.safetensors":
            fp16_bytes(base / "text_encoder" / "model.safetensors"),
    }
    for folder in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        for path in sorted((base / folder).iterdir()):
            if path.suffix in (".json", ".txt"):
                anylora[f"{folder}/{path.name}"] = path.read_bytes()
    controlnet = {
        "config.json": (cn / "config.json").read_bytes(),
        "diffusion_pytorch_model.safetensors":
            (cn / "diffusion_pytorch_model.safetensors").read_bytes(),
        "diffusion_pytorch_model.fp16.safetensors":
            fp16_bytes(cn / "diffusion_pytorch_model.safetensors"),
        "diffusion_pytorch_model.bin": os.urandom(1024),
        "images/input.png": os.urandom(512),
    }
    pth, _ = detector_pth()
    annotators = {"body_pose_model.pth": pth, "hand_pose_model.pth": detector_pth(seed=4)[0],
                  "facenet.pth": detector_pth(seed=5)[0], "ControlNetHED.pth": os.urandom(2048)}
    return {"Lykon/AnyLoRA": anylora, "lllyasviel/control_v11p_sd15_openpose": controlnet,
            "lllyasviel/Annotators": annotators}


@pytest.fixture
def hub(served: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    fake = FakeHub()
    for repo, files in served.items():
        fake.add(repo, files)
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def models_cli(*args: str, env: dict[str, str], cwd: Path | None = None,
               ) -> subprocess.CompletedProcess[str]:
    """`loraforge models ARGS` in a fresh process (as cli.py mounts it, or mounted here)."""
    from loraforge import cli
    from loraforge.models.command import models_app

    if any(group.typer_instance is models_app for group in cli.app.registered_groups):
        return run_cli("models", *args, env=env, cwd=cwd, timeout=300)
    shim = ("import sys; from loraforge import cli; from loraforge.models.command import "
            "models_app; cli.app.registered_groups = [g for g in cli.app.registered_groups if "
            "g.name != 'models']; cli.app.add_typer(models_app, name='models'); "
            "sys.argv = ['loraforge', 'models', *sys.argv[1:]]; cli.main()")
    full_env = {k: v for k, v in os.environ.items() if k != "LORAFORGE_STORAGE_ROOT"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", shim, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def hub_env(hub: FakeHub, store: Path, home: Path, token: str | None = FAKE_TOKEN,
            ) -> dict[str, str]:
    env = {"HF_ENDPOINT": hub.endpoint, "LORAFORGE_STORAGE_ROOT": str(store), "HOME": str(home),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
           "HTTP_PROXY": "", "HTTPS_PROXY": "", "ALL_PROXY": "", "http_proxy": "",
           "https_proxy": "", "all_proxy": "", "HF_HUB_OFFLINE": "", "HF_HOME": "",
           "HF_TOKEN_PATH": "", "XDG_CACHE_HOME": "", "HF_TOKEN": token or "",
           "HUGGING_FACE_HUB_TOKEN": ""}
    home.mkdir(parents=True, exist_ok=True)
    return env


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout + result.stderr


def test_fetch_all_installs_checks_and_is_idempotent(
        hub: FakeHub, served: dict[str, dict[str, bytes]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    anylora = served["Lykon/AnyLoRA"]
    unet_fp16 = anylora["unet/diffusion_pytorch_model.fp16.safetensors"]
    hub.drop_after[sha(unet_fp16)] = 2_500_000  # the connection dies once, 2.5 MB in
    env = hub_env(hub, store, tmp_path / "home")

    text = ok(models_cli("fetch", "all", env=env))
    assert "no fp16 variant of vae/diffusion_pytorch_model; fetching full precision" in text
    assert "$HF_TOKEN" in text

    # The seed's folder names; diffusers files only, fp16 variant under the plain names.
    base = store / "AnyLoRA"
    expected = {
        "unet/diffusion_pytorch_model.safetensors": unet_fp16,
        "vae/diffusion_pytorch_model.safetensors":
            anylora["vae/diffusion_pytorch_model.safetensors"],
        "text_encoder/model.safetensors": anylora["text_encoder/model.fp16.safetensors"],
        **{name: data for name, data in anylora.items()
           if name.startswith(("unet/", "vae/", "text_encoder/", "scheduler/", "tokenizer/"))
           and name.endswith((".json", ".txt"))},
    }
    on_disk = {p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()}
    assert on_disk == {*expected, "model_index.json", "manifest.json"}
    for name, data in expected.items():
        assert (base / name).read_bytes() == data, name
    index = json.loads((base / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False

    manifest = json.loads((base / "manifest.json").read_text())
    assert manifest["kind"] == "base"
    assert manifest["source"]["repo"] == "Lykon/AnyLoRA"
    assert manifest["source"]["revision"] == "main"
    assert manifest["source"]["commit"] == COMMITS["Lykon/AnyLoRA"]
    assert manifest["source"]["variant"] == "mixed"
    assert manifest["source"]["files"]["unet/diffusion_pytorch_model.fp16.safetensors"] == \
        {"size": len(unet_fp16), "sha256": sha(unet_fp16)}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (base / name).read_bytes()
        assert entry == {"size": len(data), "sha256": sha(data)}, name
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in base.rglob("*") if p.is_file())

    # The dropped download was resumed with a Range request from the last whole MiB written.
    unet_gets = hub.requests("GET", f"/cdn/{sha(unet_fp16)}")
    assert [r.headers.get("range") for r in unet_gets] == [None, f"bytes={2 << 20}-"]

    controlnet = store / "controlnet-model"
    cn_files = served["lllyasviel/control_v11p_sd15_openpose"]
    assert (controlnet / "diffusion_pytorch_model.safetensors").read_bytes() == \
        cn_files["diffusion_pytorch_model.fp16.safetensors"]
    assert {p.name for p in controlnet.iterdir()} == {
        "config.json", "diffusion_pytorch_model.safetensors", "manifest.json"}

    # The body, hand and face detectors: converted from the pickles to safetensors; the .pth
    # files are not kept anywhere.
    from safetensors.torch import load_file

    detector = store / "controlnet-detector"
    assert {p.name for p in detector.iterdir()} == {
        "body_pose_model.safetensors", "hand_pose_model.safetensors", "facenet.safetensors",
        "manifest.json"}
    for name, seed in (("body_pose_model", 3), ("hand_pose_model", 4), ("facenet", 5)):
        pth, state = detector_pth(seed)
        loaded = load_file(str(detector / f"{name}.safetensors"))
        assert loaded.keys() == state.keys()
        assert all((loaded[k] == state[k]).all() for k in state)
        assert not [p for p in store.rglob("*") if p.is_file() and p.stat().st_size == len(pth)
                    and p.read_bytes() == pth]
    pth = served["lllyasviel/Annotators"]["body_pose_model.pth"]
    det_manifest = json.loads((detector / "manifest.json").read_text())
    assert det_manifest["source"]["files"]["body_pose_model.pth"]["sha256"] == sha(pth)

    # Only what was asked for went over the wire.
    fetched = {r.path for r in hub.requests("GET") if not r.path.startswith("/api/")}
    never = ("AnyLoRA_noVae", "safety_checker", "feature_extractor", ".bin", "README",
             "ControlNetHED", "images/")
    assert not [p for p in fetched if any(n in p for n in never)]
    for blob in (sha(anylora["AnyLoRA_noVae_fp16-pruned.safetensors"]),
                 sha(anylora["unet/diffusion_pytorch_model.safetensors"])):
        assert not hub.requests(contains=blob)

    # The token goes to the Hub, never to the CDN it redirects to, and is never shown or stored.
    hub_calls = [r for r in hub.log if not r.path.startswith("/cdn/")]
    assert hub_calls and all(r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}"
                             for r in hub_calls)
    cdn_calls = hub.requests(contains="/cdn/")
    assert cdn_calls and not any("authorization" in r.headers for r in cdn_calls)
    assert FAKE_TOKEN not in text
    needle = FAKE_TOKEN.encode()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not (tmp_path / "home" / ".cache").exists()  # nothing under $HOME

    # A second fetch downloads nothing.
    before = len(hub.log)
    text = ok(models_cli("fetch", env=env))
    assert text.count("nothing downloaded") == 3
    assert [r.path for r in hub.log[before:] if not r.path.startswith("/api/")] == []

    listing = ok(models_cli("list", env=env))
    lines = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert set(lines) == {"AnyLoRA", "controlnet-model", "controlnet-detector"}
    assert sha(unet_fp16)[:10] in lines["AnyLoRA"] and "Lykon/AnyLoRA@aaaaaaaaaa" in \
        lines["AnyLoRA"]
    assert "ok (" in ok(models_cli("verify", env=env))

    # Damage one file: verify names it and fails; fetch still refuses to touch a foreign folder.
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet_file.read_bytes())
    data[-1] ^= 0xFF
    unet_file.unlink()  # a new file: the cached blob (a hard link) stays intact
    unet_file.write_bytes(bytes(data))
    result = models_cli("verify", "AnyLoRA", env=env)
    assert result.returncode == 1
    assert "changed: unet/diffusion_pytorch_model.safetensors (sha256 differs)" in result.stdout
    (store / "Mine").mkdir()
    (controlnet / "manifest.json").unlink()
    result = models_cli("fetch", "controlnet-openpose", env=env)
    assert result.returncode == 1 and "was not installed by" in result.stderr
    assert (controlnet / "diffusion_pytorch_model.safetensors").is_file()

    # `fetch` (all) fetches the other models, then names the one it left as it is; it stopped
    # at that one, and the models after it were never fetched.
    from loraforge.models.fetch import fetch_models

    shutil.rmtree(detector)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    said: list[str] = []
    with pytest.raises(ForgeError) as refused:
        fetch_models(store, "all", None, False, said.append)
    assert str(refused.value).startswith(
        f"{controlnet}: already exists and was not installed by `loraforge models fetch "
        "controlnet-openpose`; it is left as it is")
    assert "controlnet-model: skipped, it was not installed by `loraforge models fetch` (see " \
           "the end)" in said
    assert (detector / "body_pose_model.safetensors").is_file()
    assert sorted(p.name for p in controlnet.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]


def test_fetch_resumes_across_runs_with_the_login_token(
        hub: FakeHub, served: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    store, home = tmp_path / "store", tmp_path / "home"
    env = hub_env(hub, store, home, token=None)
    token_file = home / ".cache" / "huggingface" / "token"  # where `hf auth login` writes it
    token_file.parent.mkdir(parents=True)
    token_file.write_text(FAKE_TOKEN + "\n")
    weights = served["lllyasviel/control_v11p_sd15_openpose"][
        "diffusion_pytorch_model.fp16.safetensors"]
    hub.drop_after[sha(weights)] = 1_500_000
    hub.fail_after_drop.add(sha(weights))  # the first run cannot finish it

    result = models_cli("fetch", "controlnet-openpose", env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "resumes" in result.stderr and "Traceback" not in result.stderr
    assert not (store / "controlnet-model").exists()
    parts = list(store.glob("cache/huggingface/downloads/*/*.part"))
    assert [p.stat().st_size for p in parts] == [1 << 20]  # whole MiBs are kept

    hub.fail_after_drop.clear()
    text = ok(models_cli("fetch", "controlnet-openpose", env=env))
    assert "resuming at 1.0 MB" in text
    gets = hub.requests("GET", f"/cdn/{sha(weights)}")
    assert gets[-1].headers.get("range") == f"bytes={1 << 20}-"
    assert (store / "controlnet-model" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        weights
    assert not list(store.glob("cache/huggingface/downloads/*/*.part"))
    assert all(r.headers.get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.log
               if not r.path.startswith("/cdn/"))
    assert FAKE_TOKEN not in text + result.stdout + result.stderr

    # Full precision is another install; a revision the repository lacks is one clear error.
    text = ok(models_cli("fetch", "controlnet-openpose", "--full-precision", env=env))
    assert (store / "controlnet-model" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        served["lllyasviel/control_v11p_sd15_openpose"]["diffusion_pytorch_model.safetensors"]
    downloads = [p for p in store.glob("cache/huggingface/downloads/*/*") if p.is_file()]
    assert downloads and all(p.stat().st_nlink == 2 for p in downloads)  # no dead copies
    result = models_cli("fetch", "anylora", "--revision", "v9", env=env)
    assert result.returncode == 1 and "has no revision `v9`" in result.stderr
    result = models_cli("fetch", "all", "--revision", "v9", env=env)
    assert result.returncode == 1 and "cannot apply to `all`" in result.stderr
    result = models_cli("fetch", "anylora", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1 and "login node with internet" in result.stderr
    assert "Traceback" not in result.stderr


def test_fetch_tagger_installs_model_and_tags_that_then_tag_offline(tmp_path: Path) -> None:
    from loraforge.models.tagger import tiny_model_bytes, tiny_tags_csv

    model, tags = tiny_model_bytes(), tiny_tags_csv().encode()
    fake = FakeHub()
    fake.add("SmilingWolf/wd-vit-tagger-v3", {"model.onnx": model, "selected_tags.csv": tags,
                                              "README.md": b"WD tagger", "sw_jax_cv_config.json":
                                              b"{}"}, lfs_suffixes=(".onnx",))
    fake.thread.start()
    store = tmp_path / "store"
    try:
        env = hub_env(fake, store, tmp_path / "home")
        files = fake.repos["SmilingWolf/wd-vit-tagger-v3"].files
        csv = files.pop("selected_tags.csv")  # a repository without the tag list is refused
        result = models_cli("fetch", "tagger", env=env)
        assert result.returncode == 1 and "has no selected_tags.csv" in result.stderr
        assert "Traceback" not in result.stderr and not (store / "wd-tagger").exists()
        files["selected_tags.csv"] = csv
        text = ok(models_cli("fetch", "tagger", env=env))
        assert "wd-tagger: installed SmilingWolf/wd-vit-tagger-v3@dddddddddd" in text
        fetched = {r.path for r in fake.requests("GET") if not r.path.startswith("/api/")}
        assert not [p for p in fetched if "README" in p or "jax" in p]
        assert "nothing downloaded" in ok(models_cli("fetch", "tagger", env=env))
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    folder = store / "wd-tagger"
    assert (folder / "model.onnx").read_bytes() == model
    assert (folder / "selected_tags.csv").read_bytes() == tags
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "tagger"
    assert manifest["source"]["files"]["model.onnx"] == {"size": len(model), "sha256": sha(model)}
    assert manifest["files"]["selected_tags.csv"]["sha256"] == sha(tags)
    assert "wd-tagger: ok (2 files re-hashed)" in ok(models_cli("verify", env=env))

    # Offline afterwards (the Hub is gone): `dataset tag` uses it by default (models.tagger).
    concept = tmp_path / "proj" / "master_dataset" / "4_knight"
    concept.mkdir(parents=True)
    draw_character(concept / "a.png", (200, 30, 30), "box", 0)
    result = run_cli("dataset", "tag", cwd=tmp_path / "proj",
                     env={"LORAFORGE_STORAGE_ROOT": str(store), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "tagger: " in result.stdout and "wd-tagger" in result.stdout
    assert (concept / "a.txt").read_text().startswith("knight, ")


def test_a_fetch_onto_a_full_disk_is_one_message_and_leaves_no_partial(
        small_disk: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    """The downloads fit, their conversion did not: a traceback from safetensors' save_file
    (SafetensorError, not OSError) and the message of no other failure."""
    import torch

    from loraforge.models.fetch import fetch_models

    def pth(seed: int) -> bytes:  # 2 MB each
        buffer = io.BytesIO()
        torch.save({"model0.conv1_1.weight": torch.randn(
            500_000, generator=torch.Generator().manual_seed(seed))}, buffer)
        return buffer.getvalue()

    fake = FakeHub()
    fake.add("lllyasviel/Annotators", {"body_pose_model.pth": pth(3),
                                       "hand_pose_model.pth": pth(4), "facenet.pth": pth(5)})
    fake.thread.start()
    store = small_disk("7m") / "store"  # the 6 MB downloaded, then no room for the conversion
    try:
        for key, value in hub_env(fake, store, tmp_path / "home").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ForgeError) as refused:
            fetch_models(store, "openpose-detector", None, False, lambda line: None)
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    assert str(refused.value).startswith(
        f"{store}: could not install `controlnet-detector` here (about 6.0 MB): No space left "
        "on device (the disk, or your quota on it, is full)\n  fix: free space there")
    assert "the downloaded files are kept" in str(refused.value)
    assert not (store / "controlnet-detector").exists()
    assert not [p.name for p in store.iterdir() if p.name.endswith(".partial")]


def test_a_model_installed_while_fetch_downloads_is_left_in_place(
        hub: FakeHub, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    """`models fetch` looked at the destination only before downloading: an import of the same
    name that finished meanwhile (or was still installing) was replaced in silence."""
    import fcntl

    from loraforge.models.fetch import fetch_models

    store = tmp_path / "store"
    dest = store / "controlnet-model"
    for key, value in hub_env(hub, store, tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    hub.on_download = lambda: dest.exists() or shutil.copytree(tiny_store / "tiny-controlnet",
                                                               dest)
    with pytest.raises(ForgeError) as refused:
        fetch_models(store, "controlnet-openpose", None, False, lambda line: None)
    assert str(refused.value).startswith(f"{dest}: already exists and was not installed by "
                                         "`loraforge models fetch controlnet-openpose`")
    theirs = (tiny_store / "tiny-controlnet" / "manifest.json").read_text()
    assert (dest / "manifest.json").read_text() == theirs

    # an import of that name still converting holds the name's lock: the fetch waits for none
    hub.on_download = None
    shutil.rmtree(dest)
    with open(store / ".controlnet-model.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ForgeError) as refused:
            fetch_models(store, "controlnet-openpose", None, False, lambda line: None)
    assert "another process is busy with installing the model `controlnet-model` (an import " \
           "or a fetch of it)" in str(refused.value)
    assert not dest.exists() and not list(store.glob(".controlnet-model.*.partial"))


def test_a_group_shared_storage_root_gets_a_download_cache_the_group_can_update(
        hub: FakeHub, tmp_path: Path) -> None:
    """With `storage.file_mode = "0664"` the lab's next member fetches into the same storage
    root: the download cache and its lock files must be group-writable too (they took the
    user's umask, 0022, and that member's fetch was refused: Permission denied)."""
    store = tmp_path / "store"
    env = hub_env(hub, store, tmp_path / "home")
    previous = os.umask(0o022)  # a user's usual umask: what the cache got before
    try:
        ok(models_cli("fetch", "controlnet-openpose", "--set", "storage.file_mode=0664",
                      env=env))
        made = [store / "cache", *(store / "cache").rglob("*"),
                *store.glob(".*.lock"), store / "controlnet-model"]
        assert any(path.name.endswith(".lock") for path in made)
        assert [p for p in made if not p.stat().st_mode & 0o020] == []

        # the default (0644): only the owner writes, as before
        other = tmp_path / "private"
        ok(models_cli("fetch", "controlnet-openpose", env=hub_env(hub, other, tmp_path / "h2")))
        assert [p for p in (other / "cache").rglob("*") if p.stat().st_mode & 0o022] == []
    finally:
        os.umask(previous)
