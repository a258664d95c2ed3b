"""kohya's names for the LoRA modules of an SD 1.x model, as its files and A1111 spell them:
`lora_unet_<module path>` and `lora_te_text_model_<module path>`, dots made underscores. Used by
training (the files it writes) and generation (the files it reads)."""

from __future__ import annotations

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
# transformers >= 5.6 dropped `text_model.` from CLIPTextModel's paths; kohya's names keep it.
TEXT_PATH_PREFIX = "text_model."


def kohya_name(component: str, path: str) -> str:
    """The name of the module at `path` of `component` ("unet" or "text_encoder")."""
    if component == "unet":
        return UNET_PREFIX + path.replace(".", "_")
    return TEXT_PREFIX + (TEXT_PATH_PREFIX + path.removeprefix(TEXT_PATH_PREFIX)).replace(".", "_")
