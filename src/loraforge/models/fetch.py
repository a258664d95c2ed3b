"""`loraforge models fetch`: download the default models from the Hugging Face Hub (login node).

For each model: ask the Hub which files the revision holds (one API call, which also pins the
revision to a commit), choose the diffusers files (fp16 variant by default, full precision on
request, the other where one is missing), download each into `<storage>/cache/huggingface/
downloads/`, check it against the Hub's sha256 (or git blob id), assemble the model in a hidden
folder beside its destination and rename it into place, with a `manifest.json`.

Resumable across processes: a file is downloaded into `<blob>.part` and continued with an HTTP
Range request by the next run (huggingface_hub 2.x itself keeps a partial download only within
one process). After an install the download cache keeps only hard links of the installed files
(no extra disk space), so a re-fetch of another revision downloads only what changed; copies,
stale partial files and the detector's pickle are deleted.

The token (HF_TOKEN, or the token file `hf auth login` writes) is sent to the Hub only, never
to the storage servers a download is redirected to, and never printed or written anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from loraforge.errors import ForgeError
from loraforge.fsutil import disk_full, full_disk_error
from loraforge.models import folders, gpu_runtime
from loraforge.models.catalog import (
    ALL,
    DETECTOR_FILES,
    DETECTOR_SOURCE,
    HUB_MODELS,
    TAGGER_FILES,
    HubModel,
    by_key,
    keys,
)
from loraforge.models.manifest import describe_files, read_manifest, write_manifest

Say = Callable[[str], None]

DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE_VALUES = ("1", "true", "yes", "on")
CHUNK = 1 << 20
RESUME_CHUNK = 1 << 20  # bytes written to the partial file at a time while downloading
# Files of a diffusers SD pipeline that the trainer and renderer read.
BASE_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json")
BASE_OPTIONAL = ("scheduler/scheduler_config.json",)
BASE_WEIGHTS = (("unet/", "diffusion_pytorch_model"), ("vae/", "diffusion_pytorch_model"),
                ("text_encoder/", "model"))
CONTROLNET_WEIGHTS = (("", "diffusion_pytorch_model"),)
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass(frozen=True)
class Wanted:
    """One file to fetch: its path in the repository and in the installed folder."""

    repo_path: str
    dest: str
    size: int | None
    sha256: str | None  # from the Hub's LFS metadata
    blob_id: str | None  # git blob id (what a small, non-LFS file is checked against)


@dataclass
class Plan:
    model: HubModel
    revision: str
    commit: str
    variant: str | None
    files: list[Wanted]
    notes: list[str] = field(default_factory=list)


@dataclass
class FetchResult:
    model: HubModel
    path: Path
    commit: str
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    reused_files: int = 0
    up_to_date: bool = False


# --- entry point ------------------------------------------------------------------------------


def fetch_models(storage_root: Path, which: str, revision: str | None, full_precision: bool,
                 say: Say, file_mode: int = folders.FILE_MODE, cuda: str | None = None,
                 ) -> list[FetchResult]:
    """Fetch `which` (a catalog key, `all`, or the tagger's GPU runtime) into `storage_root`;
    report through `say`."""
    if which.lower() == gpu_runtime.KEY:
        if revision or full_precision:
            raise ForgeError(f"--revision and --full-precision choose Hub files; {which} is "
                             f"the pip package {gpu_runtime.PACKAGE}, pinned to "
                             f"{gpu_runtime.releases()}",
                             fix=f"loraforge models fetch {which} [--cuda 12|13]")
        gpu_runtime.install(storage_root, say, file_mode, cuda)
        return []
    if cuda is not None:
        raise ForgeError("--cuda chooses the build of the tagger's GPU runtime",
                         fix=f"loraforge models fetch {gpu_runtime.KEY} --cuda {cuda}")
    if which.lower() == ALL:
        targets = [model for model in HUB_MODELS if model.in_all]
        if revision:
            raise ForgeError("--revision names a commit of one repository; it cannot apply to "
                             "`all`", fix=f"fetch one model: one of {', '.join(keys())}")
    else:
        model = by_key(which)
        if model is None:
            raise ForgeError(f"unknown model `{which}`",
                             fix=f"choose one of {', '.join([*keys(), gpu_runtime.KEY, ALL])}")
        targets = [model]
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES:
        raise ForgeError("HF_HUB_OFFLINE is set, and `models fetch` needs the network",
                         fix="run it on a login node with internet, without HF_HUB_OFFLINE "
                             "(e.g. `env -u HF_HUB_OFFLINE loraforge models fetch ...`)")
    token, token_source = find_token(os.environ)
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).strip().rstrip("/")
    redirect_hf_home(storage_root)
    if token_source:
        say(f"using the Hugging Face token from {token_source}")
    hub = Hub(endpoint, token, say)
    results, kept = [], []
    for model in targets:
        refusal = foreign_folder(storage_root, model)
        if refusal is not None and len(targets) > 1:  # fetch the others, then say so
            say(f"{model.folder}: skipped, it was not installed by `loraforge models fetch` "
                "(see the end)")
            kept.append(refusal)
            continue
        results.append(fetch_one(hub, storage_root, model, revision, full_precision, say,
                                 file_mode))
    if len(kept) == 1:
        raise kept[0]
    if kept:
        raise ForgeError(f"{' and '.join(str(r.path) for r in kept)} already exist and were not "
                         "installed by `loraforge models fetch`; they are left as they are",
                         fix="use them as they are, or move them aside (`mv FOLDER FOLDER.old`) "
                             "and fetch again")
    return results


def redirect_hf_home(storage_root: Path) -> None:
    """Keep every Hugging Face cache under the storage root, never in $HOME."""
    home = storage_root / "cache" / "huggingface"
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "hub")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def find_token(environ: dict[str, str] | os._Environ[str]) -> tuple[str | None, str | None]:
    """(token, where it came from) from the standard Hugging Face places, or (None, None).

    HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), then the token file: HF_TOKEN_PATH, the
    user's own $HF_HOME/token (read before HF_HOME is redirected to the storage root), and
    ~/.cache/huggingface/token, where `hf auth login` writes it by default.
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = environ.get(var, "").strip()
        if value:
            return value, f"${var}"
    candidates: list[Path] = []
    if environ.get("HF_TOKEN_PATH"):
        candidates.append(Path(environ["HF_TOKEN_PATH"]).expanduser())
    if environ.get("HF_HOME"):
        candidates.append(Path(environ["HF_HOME"]).expanduser() / "token")
    if environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "token")
    candidates.append(Path.home() / ".cache" / "huggingface" / "token")
    for path in candidates:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value, str(path)
    return None, None


# --- one model --------------------------------------------------------------------------------


def fetch_one(hub: Hub, root: Path, model: HubModel, revision: str | None,
              full_precision: bool, say: Say, file_mode: int = folders.FILE_MODE,
              ) -> FetchResult:
    dest = root / model.folder
    existing = read_manifest(dest)
    refusal = foreign_folder(root, model)
    if refusal is not None:
        raise refusal
    plan = hub.plan(model, revision or "main", full_precision)
    for note in plan.notes:
        say(f"{model.folder}: {note}")
    result = FetchResult(model, dest, plan.commit)
    if existing is not None and _up_to_date(dest, existing, plan):
        result.up_to_date = True
        say(f"{model.folder}: already installed at {model.repo}@{plan.commit[:10]}; "
            "nothing downloaded")
        return result

    store = root / "cache" / "huggingface" / "downloads" / _repo_folder(model.repo)
    with folders.exclusive(store.with_name(store.name + folders.LOCK_SUFFIX),
                           f"fetching {model.repo} into this storage root"):
        folders.remove_leftovers(root, model.folder, older_than=folders.STALE_SECONDS)
        blobs: dict[str, tuple[Path, str]] = {}
        for wanted in plan.files:
            blob, digest, fetched = hub.fetch_file(model.repo, plan.commit, wanted, store)
            blobs[wanted.repo_path] = (blob, digest)
            if fetched:
                result.downloaded_files += 1
                result.downloaded_bytes += fetched
            else:
                result.reused_files += 1
        with folders.model_lock(root, model.folder):  # an import of the name holds it too
            refusal = foreign_folder(root, model)  # put there while this fetch downloaded
            if refusal is not None:
                raise refusal
            _assemble_and_install(root, dest, plan, blobs, say, file_mode)
        _prune(store)
    if result.downloaded_files:
        got = (f"downloaded {result.downloaded_files} file(s), "
               f"{human_size(result.downloaded_bytes)}")
        if result.reused_files:
            got += f"; {result.reused_files} already in the download cache"
    else:
        got = "nothing downloaded (every file was already in the download cache)"
    say(f"{model.folder}: installed {model.repo}@{plan.commit[:10]}"
        f"{f' ({plan.variant})' if plan.variant else ''}: {got} -> {dest}")
    return result


def foreign_folder(root: Path, model: HubModel) -> ForgeError | None:
    """The refusal to replace `model`'s folder when something else than `models fetch` of it
    put it there (copied by hand, imported); None when it is absent or fetch's own."""
    dest = root / model.folder
    if not (dest.exists() or dest.is_symlink()) or _installed_by_fetch(read_manifest(dest), model):
        return None
    return ForgeError(f"already exists and was not installed by `loraforge models fetch "
                      f"{model.key}`; it is left as it is", path=dest,
                      fix=f"use it as it is, or move it aside (`mv {dest} {dest}.old`) and "
                          "fetch again")


def _prune(store: Path) -> None:
    """Keep only the downloads that are hard links of installed files (they cost no space):
    drop copies, stale partial files, files of a replaced install and the detector's pickle."""
    for path in store.iterdir():
        with contextlib.suppress(OSError):
            if path.is_file() and (path.suffix == ".part" or path.stat().st_nlink < 2):
                path.unlink()


def _installed_by_fetch(manifest: dict[str, Any] | None, model: HubModel) -> bool:
    source = (manifest or {}).get("source") or {}
    return source.get("type") == "hub" and source.get("repo") == model.repo


def _up_to_date(dest: Path, manifest: dict[str, Any], plan: Plan) -> bool:
    """Installed from the same commit with the same files, none missing or resized."""
    source = manifest.get("source") or {}
    if source.get("commit") != plan.commit or source.get("variant") != plan.variant:
        return False
    if sorted(source.get("files", {})) != sorted(w.repo_path for w in plan.files):
        return False
    for rel, entry in manifest["files"].items():
        path = dest / rel
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
    return True


def _assemble_and_install(root: Path, dest: Path, plan: Plan,
                          blobs: dict[str, tuple[Path, str]], say: Say, file_mode: int) -> None:
    from loraforge.models import store

    model = plan.model
    tmp = folders.make_partial(root, model.folder)
    try:
        known: dict[str, str] = {}
        changes: list[str] = []
        for wanted in plan.files:
            blob, digest = blobs[wanted.repo_path]
            if model.kind == "detector":
                continue
            folders.link_or_copy(blob, tmp / wanted.dest)
            known[wanted.dest] = digest
        if model.kind == "base":
            changes += _finish_base(tmp)
            store.check_base_model(tmp, require_sd1=False)
        elif model.kind == "controlnet":
            store.check_controlnet(tmp, require_sd1=False)
        elif model.kind == "tagger":
            from loraforge.models.tagger import TaggerModel

            TaggerModel(tmp)  # loads in onnxruntime, its outputs match the tag list
        else:
            for source in (w.repo_path for w in plan.files):
                converted = DETECTOR_FILES[source]
                say(f"{model.folder}: converting {source} to {converted} (loaded with "
                    "weights_only=True)")
                _convert_detector(blobs[source][0], tmp / converted, model, plan.commit, source)
                changes.append(f"{converted}: converted from {source}")
        for rel in changes:  # rewritten files: hash what is there now
            known.pop(rel.split(":")[0], None)
        write_manifest(tmp, {
            "kind": model.kind,
            "source": {
                "type": "hub", "repo": model.repo, "revision": plan.revision,
                "commit": plan.commit, "variant": plan.variant, "endpoint": _public_url(
                    os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)),
                "files": {w.repo_path: {"size": blobs[w.repo_path][0].stat().st_size,
                                        "sha256": blobs[w.repo_path][1]} for w in plan.files},
                "changes": changes,
            },
            "files": describe_files(tmp, known),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        folders.fix_modes(tmp, file_mode)
        folders.install(tmp, dest)
    except Exception as exc:  # safetensors and the tokenizer raise their own errors
        if isinstance(exc, ForgeError) or not disk_full(exc):
            raise
        size = sum(blob.stat().st_size for blob, _ in blobs.values())
        raise full_disk_error(exc, root, "its half-written copy was removed, the downloaded "
                              "files are kept for the rerun, and no other model was touched",
                              what=f"could not install `{model.folder}` here (about "
                                   f"{human_size(size)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish_base(folder: Path) -> list[str]:
    """Drop the unused safety checker from model_index.json; fill a missing tokenizer or
    scheduler from the built-in ones. Returns the files changed or added."""
    changes: list[str] = []
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    dropped = [name for name in UNUSED_COMPONENTS if isinstance(index.get(name), list)
               and index[name] != [None, None]]
    if dropped or index.get("requires_safety_checker"):
        for name in dropped:
            index[name] = [None, None]
        index["requires_safety_checker"] = False
        _rewrite(index_file, json.dumps(index, indent=2, sort_keys=True) + "\n")
        changes.append(f"model_index.json: without {', '.join(dropped) or 'safety checker'}")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        from loraforge.models.tiny import sd15_config

        scheduler.parent.mkdir(parents=True, exist_ok=True)
        scheduler.write_text(json.dumps(sd15_config("scheduler"), indent=2) + "\n",
                             encoding="utf-8")
        changes.append("scheduler/scheduler_config.json: SD 1.5's (the repository has none)")
    tokenizer = folder / "tokenizer"
    if not any(tokenizer.glob("*")):
        from loraforge.models.tokenizer import new_clip_tokenizer, write_vocab_files

        new_clip_tokenizer().save_pretrained(tokenizer)
        write_vocab_files(tokenizer)
        changes += [f"tokenizer/{p.name}: built in (the repository has none)"
                    for p in sorted(tokenizer.iterdir())]
    return changes


def _rewrite(path: Path, text: str) -> None:
    """Replace a file that may be a hard link into the download cache without changing the cache."""
    path.unlink()
    path.write_text(text, encoding="utf-8")


def _convert_detector(pth: Path, dest: Path, model: HubModel, commit: str,
                      source: str = DETECTOR_SOURCE) -> None:
    import pickle

    import torch
    from safetensors.torch import save_file

    try:
        data = torch.load(pth, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForgeError(f"{model.repo}/{source} cannot be loaded safely "
                         f"(weights_only=True refused it: {reason}); it is not converted",
                         fix="report it; LoRA Forge never unpickles a file fully") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise ForgeError(f"{model.repo}/{source} is not a state dict of tensors",
                         fix="check --revision; the detector must be a plain state dict")
    tensors = {k: v.detach().contiguous().clone() for k, v in data.items()}
    save_file(tensors, str(dest), metadata={"format": "pt",
                                            "source": f"{model.repo}/{source}@{commit}"})


# --- the Hub ----------------------------------------------------------------------------------


class Hub:
    """The few Hub calls fetch needs, through huggingface_hub, with errors made readable."""

    def __init__(self, endpoint: str, token: str | None, say: Say) -> None:
        self.endpoint = endpoint
        self.token = token
        self.say = say
        self.progress_every = 2.0 if sys.stdout.isatty() else 15.0

    def plan(self, model: HubModel, revision: str, full_precision: bool) -> Plan:
        from huggingface_hub import HfApi

        with self._errors(model, revision):
            info = HfApi(endpoint=self.endpoint).model_info(
                model.repo, revision=revision, files_metadata=True, token=self.token or False)
        if not info.sha or not info.siblings:
            raise ForgeError(f"the Hub's answer for {model.repo}@{revision} lists no commit or "
                             "no files", fix="check HF_ENDPOINT points at a Hugging Face Hub")
        siblings = {}
        for sibling in info.siblings:
            lfs = sibling.lfs
            siblings[sibling.rfilename] = Wanted(
                sibling.rfilename, sibling.rfilename, sibling.size,
                lfs.sha256 if lfs is not None else None, sibling.blob_id)
        plan = Plan(model, revision, info.sha, None, [])
        _select(plan, siblings, full_precision)
        return plan

    def fetch_file(self, repo: str, commit: str, wanted: Wanted, store: Path,
                   ) -> tuple[Path, str, int]:
        """A complete, checked copy of `wanted` in `store`: (path, sha256, bytes downloaded)."""
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        # http_get writes whole chunks (10 MiB by default): a dropped connection or a killed
        # run loses at most one chunk of what it had received.
        hf_constants.DOWNLOAD_CHUNK_SIZE = min(hf_constants.DOWNLOAD_CHUNK_SIZE, RESUME_CHUNK)
        store.mkdir(parents=True, exist_ok=True)
        key = _safe_key(wanted.sha256 or wanted.blob_id)
        if key is not None:
            blob = store / key
            if blob.is_file():
                digest = _checked(blob, wanted)
                if digest is not None:
                    return blob, digest, 0
                blob.unlink()
        url = hf_hub_url(repo, wanted.repo_path, revision=commit, endpoint=self.endpoint)
        with self._errors(None, commit, wanted.repo_path):
            meta = get_hf_file_metadata(url, token=self.token or False)
            key = key or _safe_key(meta.etag)
            if key is None:
                raise ForgeError(f"the Hub gave no checksum or ETag for {repo}/"
                                 f"{wanted.repo_path}", fix="try again later")
            size = wanted.size if wanted.size is not None else meta.size
            blob, part = store / key, store / f"{key}.part"
            have = part.stat().st_size if part.is_file() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            same_origin = _origin(meta.location) == _origin(self.endpoint)
            headers = build_hf_headers(token=(self.token or False) if same_origin else False)
            if size is None or have < size:
                state = f"resuming at {human_size(have)} of" if have else "downloading"
                self.say(f"  {state} {wanted.repo_path} ({human_size(size)})")
                progress = functools.partial(_Progress, say=self.say, label=wanted.repo_path,
                                             every=self.progress_every)
                with open(part, "ab") as fh:
                    http_get(meta.location, fh, resume_size=have, headers=headers,
                             expected_size=size, displayed_filename=wanted.repo_path,
                             tqdm_class=progress)  # type: ignore[arg-type]
        got = part.stat().st_size
        digest = _checked(part, wanted)
        if digest is None:
            part.unlink(missing_ok=True)
            raise ForgeError(f"the download of {repo}/{wanted.repo_path} does not match the "
                             "Hub's checksum; it was deleted", fix="run the same command again")
        os.replace(part, blob)
        return blob, digest, max(got - have, 0)

    @contextmanager
    def _errors(self, model: HubModel | None, revision: str, path: str | None = None,
                ) -> Iterator[None]:
        """Hub and network failures as one message naming the fix (never the token)."""
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        what = model.repo if model is not None else "the repository"
        token_fix = ("log in with `hf auth login` (or set HF_TOKEN) on this node"
                     if not self.token else "check that your token may read it")
        try:
            yield
        except RevisionNotFoundError:
            raise ForgeError(f"{what} has no revision `{revision}`",
                             fix="pass a branch, tag or commit sha of that repository to "
                                 "--revision") from None
        except GatedRepoError:
            raise ForgeError(f"{what} is gated: accept its terms on the Hub first",
                             fix=token_fix) from None
        except RepositoryNotFoundError:
            raise ForgeError(f"{what} was not found, or is private", fix=token_fix) from None
        except RemoteEntryNotFoundError:
            raise ForgeError(f"{path} is listed but cannot be downloaded at {revision[:10]}",
                             fix="run the same command again") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise ForgeError(f"the Hub answered HTTP {status} for {path or what}",
                             fix="try again later; a rerun resumes where this one stopped"
                             ) from None
        except (httpx2.HTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
            raise ForgeError(f"cannot reach {_public_url(self.endpoint)} "
                             f"({type(exc).__name__}{': ' if str(exc) else ''}"
                             f"{str(exc).splitlines()[0] if str(exc) else ''})",
                             fix="run `loraforge models fetch` on a login node with internet "
                                 "(compute nodes have none), or check HF_ENDPOINT and your "
                                 "proxy settings; a rerun resumes where this one stopped"
                             ) from None
        except OSError as exc:
            reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ForgeError(f"fetching {path or what} failed ({reason})",
                             fix="free disk space or fix the permissions named, then run the "
                                 "same command again; it resumes where this one stopped"
                             ) from None


def _select(plan: Plan, siblings: dict[str, Wanted], full_precision: bool) -> None:
    """Choose the files to fetch: configs, tokenizer, one weights file per component."""
    model = plan.model
    files: list[Wanted] = []
    if model.kind == "detector":
        if DETECTOR_SOURCE not in siblings:
            raise ForgeError(f"{model.repo}@{plan.revision} has no {DETECTOR_SOURCE}",
                             fix="check --revision")
        plan.files = [siblings[DETECTOR_SOURCE]]
        plan.files += [siblings[name] for name in DETECTOR_FILES
                       if name != DETECTOR_SOURCE and name in siblings]
        return
    if model.kind == "tagger":
        missing = [name for name in TAGGER_FILES if name not in siblings]
        if missing:
            raise ForgeError(f"{model.repo}@{plan.revision} has no {', '.join(missing)}: not a "
                             "WD14 ONNX tagger", fix="check --revision")
        plan.files = [siblings[name] for name in TAGGER_FILES]
        return
    configs = BASE_CONFIGS if model.kind == "base" else ("config.json",)
    for name in configs:
        if name not in siblings:
            raise ForgeError(f"{model.repo}@{plan.revision} has no {name}: not a diffusers "
                             f"{'pipeline' if model.kind == 'base' else 'ControlNet'}",
                             fix="check --revision")
        files.append(siblings[name])
    if model.kind == "base":
        files += [siblings[name] for name in BASE_OPTIONAL if name in siblings]
        files += [w for name, w in sorted(siblings.items()) if name.startswith("tokenizer/")
                  and name.count("/") == 1 and name.endswith((".json", ".txt"))]
    variants = set()
    for prefix, stem in BASE_WEIGHTS if model.kind == "base" else CONTROLNET_WEIGHTS:
        half, full = f"{prefix}{stem}.fp16.safetensors", f"{prefix}{stem}.safetensors"
        order = (full,) if full_precision else (half, full)
        chosen = next((name for name in order if name in siblings), None)
        if chosen is None:
            there = sorted(n for n in siblings if n.startswith(prefix) and "/" not in
                           n[len(prefix):] and n.endswith((".safetensors", ".bin", ".ckpt")))
            wanted = "full-precision " if full_precision else ""
            raise ForgeError(
                f"{model.repo}@{plan.revision} has no {wanted}safetensors weights for "
                f"{prefix.rstrip('/') or 'the model'} (found: {', '.join(there) or 'none'})",
                fix=("fetch the fp16 variant (drop --full-precision)" if full_precision and half
                     in siblings else "LoRA Forge downloads .safetensors only; check --revision"))
        if chosen == full and not full_precision:
            plan.notes.append(f"no fp16 variant of {prefix}{stem}; fetching full precision")
        variants.add("fp16" if chosen == half else "full")
        files.append(Wanted(chosen, full, siblings[chosen].size, siblings[chosen].sha256,
                            siblings[chosen].blob_id))
    plan.variant = variants.pop() if len(variants) == 1 else "mixed"
    plan.files = files


# --- helpers ----------------------------------------------------------------------------------


class _Progress:
    """A tqdm stand-in for huggingface_hub's http_get: one line every few seconds, no bars."""

    def __init__(self, *, say: Say, label: str, every: float, total: int | None = None,
                 initial: int = 0, **_: Any) -> None:
        self.say, self.label, self.every = say, label, every
        self.total, self.done, self.started_at = total, initial, initial
        self.start = self.last = time.monotonic()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float | None = 1) -> None:
        self.done += int(n or 0)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.started_at) / max(now - self.start, 1e-6)
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.say(f"  {self.label}: {human_size(self.done)} of {human_size(self.total)}"
                     f"{share}, {human_size(rate)}/s")

    def close(self) -> None:
        pass


def _checked(path: Path, wanted: Wanted) -> str | None:
    """sha256 of `path` when it matches what the Hub says about `wanted`, else None.

    An LFS file is checked against its sha256; a small, non-LFS file (the Hub keeps those under
    10 MB) against its git blob id, with huggingface_hub's own hash functions."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    if wanted.size is not None and path.stat().st_size != wanted.size:
        return None
    with open(path, "rb") as fh:
        digest = sha_fileobj(fh, CHUNK).hex()
    if wanted.sha256 is not None:
        return digest if digest == wanted.sha256 else None
    if wanted.blob_id is not None:
        return digest if git_hash(path.read_bytes()) == wanted.blob_id else None
    return digest


def _safe_key(value: str | None) -> str | None:
    if not value:
        return None
    key = "".join(c for c in value if c.isalnum() or c in "-_")
    return key or None


def _repo_folder(repo: str) -> str:
    from huggingface_hub.file_download import repo_folder_name

    return repo_folder_name(repo_id=repo, repo_type="model")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _public_url(url: str) -> str:
    """`url` without any user:password part."""
    parts = urlsplit(url.strip().rstrip("/"))
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def human_size(n: float | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
