"""The process environment for heavy work: offline switches, caches on lab storage, device."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loraforge.config import Settings

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE",
                    "HF_DATASETS_OFFLINE")


def _not_the_torchvision_notice(record: logging.LogRecord) -> bool:
    """transformers tells, on importing diffusers' pipelines, that CLIP's image processor
    "requires torchvision (not installed)" and to install it: we never use that processor, and
    installing torchvision could replace the pinned torch (README: Versions)."""
    return "requires torchvision (not installed)" not in record.getMessage()


def hide_torchvision_notice() -> None:
    """Keep that notice out of the output (stdlib logging only: transformers is not imported)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_the_torchvision_notice)


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
    hide_torchvision_notice()


def pick_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def quiet_loading(errors: bool = True) -> Iterator[None]:
    """While models are imported, loaded, built or converted: no progress bars and no
    diffusers/transformers warnings (carriage-return noise and chatter in job logs); their
    errors still show unless `errors` is False (for a step whose failure we report in our own
    words). Everything is as it was afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    levels = [library.get_verbosity() for library in libraries]
    bars = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.set_verbosity(library.ERROR if errors else library.CRITICAL)
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, level, bar in zip(libraries, levels, bars, strict=True):
            library.set_verbosity(level)
            if bar:
                library.enable_progress_bar()


class SignalFlag:
    """The named signals (e.g. "SIGUSR1") turned into a flag that a loop checks where stopping
    is safe, for the length of a `with` block; the handlers from before are put back at its
    end. Each signal logs `log`'s warning "<SIGNAL> received: <says>"."""

    def __init__(self, names: tuple[str, ...], log: logging.Logger, says: str) -> None:
        self.names, self.log, self.says = names, log, says
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for name in self.names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(number).name
        self.log.warning("%s received: %s", self.signal_name, self.says)

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def given(self) -> bool:
        return self.signal_name is not None
