"""Write a LoRA the ecosystem reads: kohya keys, the trained alpha, `ss_*` and `modelspec.*`
metadata, and the hashes A1111's additional-networks uses to identify a file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.fsutil import write_atomic
from loraforge.train.network import Target, lora_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

SAVE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def kohya_state_dict(models: dict[str, nn.Module], targets: list[Target], precision: str,
                     ) -> dict[str, torch.Tensor]:
    """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for every target."""
    import torch

    dtype = getattr(torch, SAVE_DTYPES[precision])
    tensors = {key: value.detach().to("cpu", dtype).contiguous()
               for key, value in lora_weights(models, targets).items()}
    for target in targets:
        tensors[f"{target.kohya_name}.alpha"] = torch.tensor(float(target.alpha), dtype=dtype)
    return dict(sorted(tensors.items()))


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    header_len = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + header_len]), blob[8 + header_len:]


def payload_hashes(payload: bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash): sha256 of the tensor bytes after the safetensors
    header, and the legacy hash (sha256 of 64 KiB at offset 1 MiB, first 8 hex digits)."""
    return (hashlib.sha256(payload).hexdigest(),
            hashlib.sha256(payload[0x100000:0x110000]).hexdigest()[:8])


def _assemble(header: dict[str, Any], metadata: dict[str, str], payload: bytes) -> bytes:
    """safetensors bytes with the header in sorted key order, so the same tensors and metadata
    always give the same file (safetensors' own writer orders metadata at random)."""
    text = json.dumps({**header, "__metadata__": metadata}, sort_keys=True,
                      separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
              mode: int) -> dict[str, str]:
    """Save atomically with string metadata (hashes added); returns the metadata written."""
    from safetensors.torch import save

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    header, payload = _split(save(tensors))
    model_hash, legacy = payload_hashes(payload)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy
    meta["modelspec.hash_sha256"] = "0x" + model_hash
    write_atomic(path, _assemble(header, meta, payload), mode)
    return meta
