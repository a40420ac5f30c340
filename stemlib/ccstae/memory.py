"""A GPU that runs out of memory, said in one sentence that names the setting to lower.

The gpu preset fills a large card: 256 patterns per training step, up to 2,048 per inference
step (one chunk of the scan store at most; its 128-channel encoder holds about 66 MB per
pattern of 256 px in bfloat16, the refinement's Jacobian about 2.5 MB). On a smaller card, or
with larger patterns, PyTorch's allocation fails with a long message about its allocator; what
a user can change is the batch in the CC-ST-AE's settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import ResourceError

__all__ = ["gpu_memory_explained"]


@contextlib.contextmanager
def gpu_memory_explained(
    step: str, *, setting: str, value: int, device: torch.device
) -> Iterator[None]:
    """Inside the block, PyTorch's out-of-memory error becomes one :class:`ResourceError` that
    names ``step``, the card and its memory, and the config field ``setting`` (now ``value``)
    to lower.

    Parameters
    ----------
    step
        What ran out, e.g. ``"training"``.
    setting, value
        The :class:`~stemlib.ccstae.CCSTAEConfig` field that sets the batch of that step, and
        its value.
    device
        Where the step runs.

    Examples
    --------
    >>> with gpu_memory_explained(
    ...     "training", setting="batch_size", value=256, device=torch.device("cpu")
    ... ):
    ...     raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    Traceback (most recent call last):
    stemlib.errors.ResourceError: CC-ST-AE's training ran out of memory on the cpu with \
batch_size 256; give it a smaller batch_size (say 128) in its settings, or run it on a device \
with more memory.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed step held, for the next task on this GPU
        smaller = max(value // 2, 1)
        raise ResourceError(
            f"CC-ST-AE's {step} ran out of memory on {_card(device)} with {setting} {value}; "
            f"give it a smaller {setting} (say {smaller}) in its settings, or run it on a device "
            "with more memory."
        ) from None


def _card(device: torch.device) -> str:
    """``device`` in words: a GPU's name and memory, or ``the cpu``."""
    if device.type != "cuda":
        return f"the {device.type}"
    try:
        total = torch.cuda.get_device_properties(device).total_memory
        return f"{device} ({torch.cuda.get_device_name(device)}, {total / 2**30:.0f} GiB)"
    except Exception:  # noqa: BLE001 - a GPU in trouble still gets its sentence
        return str(device)
