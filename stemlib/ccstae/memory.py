"""Memory: steps sized to the device, and a GPU that runs out said in one sentence.

The gpu preset fills a large card: 256 patterns per training step, up to 2,048 per inference
step (one chunk of the scan store at most); its 128-channel encoder holds about 66 MB per
pattern of 256 px in bfloat16 when it infers, more when it trains. Where a step would not fit
in a share of the device's free memory, :func:`batch_that_fits` takes fewer patterns per
inference step, and cuts each training step into slices whose gradients are summed (the same
step), so the preset runs on a smaller card, or on a CPU, without a setting changed;
:func:`search_block` and :func:`template_block` do the same for the rotation search and the
starting bases that precede the network. The
estimates are measured, not exact: where a step still runs out, :func:`gpu_memory_explained`
turns PyTorch's long message about its allocator into the setting a user can lower.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch

from ..errors import ResourceError
from .model import CCSTAE

__all__ = [
    "gpu_memory_explained",
    "batch_that_fits",
    "pattern_bytes",
    "search_block",
    "search_bytes",
    "template_block",
    "free_memory",
    "host_available",
]

#: What one pattern's inference holds, in float32 copies of the encoder's largest feature map
#: (its first stage: channels x the encoder's input size) ...
ENCODER_MAPS = 5
#: ... and in float32 values per pixel of the pattern (the refinement's warps, residuals and
#: Jacobian). Measured on a CPU (peak RSS over batch sizes, under no_grad): the encoder alone
#: 3.9-5.0 maps for both presets at 64-256 px, in float32 and in bfloat16 maps (a GPU's
#: autocast keeps the norms in float32, so float32 is counted); the refinement alone 30-35
#: values per pixel at 128-256 px; the whole inference 36 MB per pattern of 128 px with the gpu
#: preset (estimated 45 MB); the cpu preset's encoder and refinement one after the other
#: (``benchmarks/step_memory.py``) 0.96 / 3.8 / 12.3 MB at 64 / 128 / 256 px (estimated 1.1 /
#: 4.5 / 17.8 MB).
REFINE_VALUES_PER_PIXEL = 48
#: What one pattern's training step holds (forward and backward), the same way. Measured on a
#: CPU (peak RSS, float32): 23.5 MB per pattern of 64 px, 82 MB at 128 px and 282 MB at 256 px
#: with the gpu preset (estimated 26, 104 and 415 MB); with the cpu preset 1.2-1.4 / 3.8-5.9 /
#: 15.6-16.3 MB at 64 / 128 / 256 px (estimated 1.6 / 6.3 / 25 MB).
TRAINING_MAPS = 12
TRAINING_VALUES_PER_PIXEL = 48
#: What one pattern of the rotation search holds (:func:`search_bytes`), in float32 values per
#: pixel of the pattern and per polar sample of its ring. Measured on a CPU (peak RSS over
#: blocks of 32 and 128 patterns, 720 angles, a ring of 8-44 % of the pattern's size): 0.5-0.6
#: MB per pattern of 64 px, 1.3-1.9 MB at 128 px and 1.6-2.9 MB at 256 px (estimated 1.0, 2.1
#: and 5.3 MB).
SEARCH_VALUES_PER_PIXEL = 8
SEARCH_VALUES_PER_SAMPLE = 12
#: What one pattern of a block of the starting bases' registration and solve holds
#: (:func:`stemlib.ccstae.template.learn_bases`), in float32 values per pixel. Measured on a CPU
#: (peak RSS, blocks of 64 to 256 patterns): 42-60 at 128 px, 47-56 at 256 px, 30 at 512 px.
#: 256 simulated patterns of 512 px: 8.6 GB in blocks of 256, 3.5 GB in blocks of 89 (a quarter
#: of this machine's 24 GB), in the same time (290 s), the same bases to 4e-7 of 0.044.
TEMPLATE_VALUES_PER_PIXEL = 64
#: The share of a device's free memory that one step may fill: a GPU is this run's (its cached
#: blocks count as free); a host's memory is shared with the run's other tasks (the py4DSTEM
#: baseline, the scan's chunks), and smaller steps cost a CPU nothing.
SHARE = {"cuda": 0.5, "cpu": 0.25}


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


def pattern_bytes(model: CCSTAE, pattern_shape: tuple[int, int], *, training: bool = False) -> int:
    """Bytes that one pattern of ``pattern_shape`` (H, W) holds at the peak of an inference
    step (:data:`ENCODER_MAPS`, :data:`REFINE_VALUES_PER_PIXEL`) or of a training step, its
    forward pass's saved activations and the backward pass (:data:`TRAINING_MAPS`,
    :data:`TRAINING_VALUES_PER_PIXEL`).

    Examples
    --------
    >>> from stemlib.ccstae import CCSTAEConfig
    >>> from stemlib.ccstae.model import build_model
    >>> gpu = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(128, 128), center=(64, 64))
    >>> [round(pattern_bytes(gpu, (128, 128), training=t) / 1e6, 1) for t in (False, True)]
    [45.1, 103.8]

    (MB; measured 36 and 82.)
    """
    maps, per_pixel = (
        (TRAINING_MAPS, TRAINING_VALUES_PER_PIXEL)
        if training
        else (ENCODER_MAPS, REFINE_VALUES_PER_PIXEL)
    )
    channels, h, w = model.encoder.feature_map
    return int(4 * (maps * channels * h * w + per_pixel * math.prod(pattern_shape)))


def free_memory(device: torch.device) -> int:
    """Bytes free for this process on ``device``: a CUDA card's free memory plus what PyTorch
    holds cached there; else the host's available memory, no more than its control group (a
    container's limit) leaves (:func:`host_available`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return host_available()


def host_available(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of host memory available: psutil's ``available``, or less where this process's
    control group under ``cgroup`` (v2, or v1's ``memory`` controller: a container's or a
    Kubernetes pod's limit) leaves less (:func:`_cgroup_left`)."""
    available = psutil.virtual_memory().available
    left = _cgroup_left(cgroup)
    return available if left is None else max(min(available, left), 0)


def _cgroup_left(cgroup: Path) -> int | None:
    """Bytes that the memory limit of the control group mounted at ``cgroup`` leaves: the limit
    less the working set, which is the usage less the inactive file cache (the kernel reclaims
    that cache before it runs out; a container that has read a large scan has its usage near its
    limit by cache alone). The working set is the figure the kubelet evicts on.

    cgroup v2: ``memory.max``, ``memory.current`` and ``inactive_file`` of ``memory.stat``; v1
    (under ``memory/``): ``memory.limit_in_bytes``, ``memory.usage_in_bytes`` and
    ``total_inactive_file``. None where neither sets a limit (v2's ``max``; v1's no limit is a
    number beyond any memory, which the caller's minimum takes care of) or none can be read.
    """
    for folder, limit_file, usage_file, cache in (
        (cgroup, "memory.max", "memory.current", "inactive_file"),
        (
            cgroup / "memory",
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        ),
    ):
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max":
            return None
        try:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            inactive = int(stat.get(cache, 0))
        except (OSError, ValueError):
            inactive = 0
        return int(limit) - max(usage - inactive, 0)
    return None


def batch_that_fits(
    model: CCSTAE,
    pattern_shape: tuple[int, int],
    *,
    requested: int,
    device: torch.device,
    training: bool = False,
    free: int | None = None,
) -> tuple[int, str | None]:
    """Patterns per inference step, or per forward and backward pass of a training step
    (``training``; :func:`stemlib.ccstae.train.train` sums the gradients of a step's slices):
    ``requested``, or as many as fit in :data:`SHARE` of the device's free memory when fewer
    (one at least), and the sentence that says so.

    Parameters
    ----------
    model
        The model (:func:`pattern_bytes`).
    pattern_shape
        (H, W) px.
    requested
        The config's ``infer_batch_size``, or its ``batch_size`` (``training``).
    device
        Where it runs.
    training
        A training step's patterns, else an inference step's.
    free
        Bytes free there; None reads them (:func:`free_memory`).

    Returns
    -------
    (int, str or None)
        The batch, and None when it is ``requested``, else a line for the run's progress.

    Examples
    --------
    >>> from stemlib.ccstae import CCSTAEConfig
    >>> from stemlib.ccstae.model import build_model
    >>> gpu = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(128, 128), center=(64, 64))
    >>> cpu = torch.device("cpu")
    >>> batch_that_fits(gpu, (128, 128), requested=2048, device=cpu, free=2**40)
    (2048, None)
    >>> batch, line = batch_that_fits(gpu, (128, 128), requested=2048, device=cpu, free=20 * 2**30)
    >>> batch
    119
    >>> print(line)
    ccstae: inference in steps of 119 patterns: infer_batch_size 2,048 would hold about 92 GB, \
and a quarter of the 21 GB free on the cpu is 5.4 GB
    >>> batch, line = batch_that_fits(
    ...     gpu, (128, 128), requested=256, device=cpu, training=True, free=20 * 2**30
    ... )
    >>> print(line)
    ccstae: training steps of 256 patterns in slices of 51, their gradients summed: batch_size \
256 would hold about 27 GB, and a quarter of the 21 GB free on the cpu is 5.4 GB
    """
    per_pattern = pattern_bytes(model, pattern_shape, training=training)
    if training:
        step = (
            f"training steps of {requested:,} patterns in slices of {{fits:,}}, their gradients "
            "summed"
        )
        return _fitted(per_pattern, requested, device, free, step=step, asked="batch_size")
    step = "inference in steps of {fits:,} patterns"
    return _fitted(per_pattern, requested, device, free, step=step, asked="infer_batch_size")


def search_bytes(
    pattern_shape: tuple[int, int], *, radii: tuple[float, float], n_angles: int
) -> int:
    """Bytes that one pattern of ``pattern_shape`` (H, W) holds at the peak of the rotation
    search (:func:`stemlib.ccstae.rotation.centred_features`): :data:`SEARCH_VALUES_PER_PIXEL`
    float32 values per pixel (the beam's centre of mass) and :data:`SEARCH_VALUES_PER_SAMPLE`
    per polar sample (one per px of the ring ``radii`` (inner, outer) px, times ``n_angles``).

    Examples
    --------
    >>> round(search_bytes((256, 256), radii=(20.0, 112.0), n_angles=720) / 1e6, 1)
    5.3

    (MB; measured 1.6-2.9 MB with a ring of 20-113 px.)
    """
    pixels = math.prod(pattern_shape)
    samples = (int(radii[1] - radii[0] + 0.5) + 1) * n_angles
    return int(4 * (SEARCH_VALUES_PER_PIXEL * pixels + SEARCH_VALUES_PER_SAMPLE * samples))


def search_block(
    pattern_shape: tuple[int, int],
    *,
    radii: tuple[float, float],
    n_angles: int,
    requested: int,
    device: torch.device,
    free: int | None = None,
) -> tuple[int, str | None]:
    """Patterns per block of the rotation search (:func:`search_bytes`): ``requested`` (the
    config's ``infer_batch_size``, no more than the sample or a stored chunk holds), or as many
    as fit in :data:`SHARE` of the device's free memory when fewer, and the sentence that says
    so; as :func:`batch_that_fits`.

    Examples
    --------
    >>> block, line = search_block(
    ...     (256, 256), radii=(20.0, 112.0), n_angles=720, requested=2048,
    ...     device=torch.device("cpu"), free=8 * 2**30,
    ... )
    >>> print(line)
    ccstae: rotation search in blocks of 404 patterns: blocks of 2,048 would hold about 11 GB, \
and a quarter of the 8.6 GB free on the cpu is 2.1 GB
    """
    per_pattern = search_bytes(pattern_shape, radii=radii, n_angles=n_angles)
    step = "rotation search in blocks of {fits:,} patterns"
    return _fitted(per_pattern, requested, device, free, step=step, asked="blocks of")


def template_block(
    pattern_shape: tuple[int, int],
    *,
    requested: int,
    device: torch.device,
    free: int | None = None,
) -> tuple[int, str | None]:
    """Patterns per block of the starting bases' registration and solve
    (:func:`stemlib.ccstae.template.learn_bases`, :data:`TEMPLATE_VALUES_PER_PIXEL`):
    ``requested``, or as many as fit in :data:`SHARE` of the device's free memory when fewer,
    and the sentence that says so; as :func:`batch_that_fits`.

    Examples
    --------
    >>> block, line = template_block(
    ...     (512, 512), requested=256, device=torch.device("cpu"), free=16 * 2**30
    ... )
    >>> print(line)
    ccstae: starting bases in blocks of 64 patterns: blocks of 256 would hold about 17 GB, and \
a quarter of the 17 GB free on the cpu is 4.3 GB
    """
    per_pattern = 4 * TEMPLATE_VALUES_PER_PIXEL * math.prod(pattern_shape)
    step = "starting bases in blocks of {fits:,} patterns"
    return _fitted(per_pattern, requested, device, free, step=step, asked="blocks of")


def _fitted(
    per_pattern: int,
    requested: int,
    device: torch.device,
    free: int | None,
    *,
    step: str,
    asked: str,
) -> tuple[int, str | None]:
    """``requested``, or the patterns of ``per_pattern`` bytes that fit in :data:`SHARE` of
    ``free`` (None: :func:`free_memory`) when fewer, one at least; and None, or the line that
    says so: ``step`` (a format string of ``fits``), and what ``asked`` (the setting, or the
    words, before the number asked for) would have held."""
    free = free_memory(device) if free is None else free
    share = SHARE.get(device.type, SHARE["cpu"])
    fits = max(int(share * free // per_pattern), 1)
    if fits >= requested:
        return requested, None
    words = {0.5: "half", 0.25: "a quarter"}.get(share, f"{share:.0%}")
    return fits, (
        f"ccstae: {step.format(fits=fits)}: {asked} {requested:,} would hold about "
        f"{_gb(requested * per_pattern)} GB, and {words} of the "
        f"{_gb(free)} GB free on {_card(device)} is {_gb(share * free)} GB"
    )


def _gb(size: float) -> str:
    """Bytes as GB to two figures (``"8.6"``, ``"0.42"``), whole from 10 GB (``"106"``)."""
    gb = size / 1e9
    return f"{gb:.0f}" if gb >= 10 else f"{gb:.2g}"
