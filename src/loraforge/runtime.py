"""The process environment for heavy work: offline switches, caches on lab storage, device."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE",
                    "HF_DATASETS_OFFLINE")


def go_offline(settings: Settings) -> None:
    """Never reach the network; keep every Hugging Face and torch.compile cache under the
    storage root.

    Call before diffusers or transformers are imported: they read these once.
    """
    for switch in OFFLINE_SWITCHES:
        os.environ[switch] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HOME"] = str(settings.cache_dir / "huggingface")
    # torch.compile's kernels (train.compile_unet, generate.compile): kept for later jobs, on
    # lab storage rather than the node's /tmp and ~/.triton.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir / "torch-inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(settings.cache_dir / "triton"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
