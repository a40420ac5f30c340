"""Training: Adam on the cycle loss, the ring-mask schedule, checkpoints that a rerun resumes from.

Each epoch streams the scan once (:class:`stemlib.ccstae.data.PatternStream`, shuffled by
``(seed, epoch)``), with the ring of :meth:`stemlib.masks.MaskSchedule.mask` for that epoch.
The learning rate decays by a cosine from ``lr`` to ``lr / 20``. On CUDA the forward pass runs
under bf16 autocast (the bases, the warps and the loss in float32) and optionally ``torch.compile``.

A batch whose loss is not finite, or above ``outlier_factor`` x the running loss, is skipped
and counted. A batch too large for the device's memory is passed in slices whose gradients are
summed: the same step (``slice_size``). After every epoch a checkpoint (:class:`Checkpoint`)
is written atomically; a run started with the same scan and config continues from it and
reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..io.storage import Location, remove, staged_file
from ..masks import MaskSchedule
from ..provenance import fingerprint, software_versions, utc_now
from .config import CCSTAEConfig
from .data import PatternStream, loader
from .loss import cycle_loss, outlier_threshold, robust_mean
from .model import CCSTAE, accelerated, mixed_precision

__all__ = [
    "Checkpoint",
    "train",
    "seeded",
    "model_folder",
    "model_folder_name",
    "INFERENCE_ONLY_FIELDS",
]

log = logging.getLogger("stemlib.ccstae")

#: Config fields that do not change training: a checkpoint is reused when only these differ.
INFERENCE_ONLY_FIELDS = frozenset(
    {
        "infer_batch_size",
        "refine_steps",
        "num_workers",
        "disk_gains",
        "rigid_disks",
        "neighbour_starts",
        "ellipse",
    }
)

CHECKPOINT_NAME = "checkpoint.pt"


def _training_fields(config: CCSTAEConfig) -> dict[str, Any]:
    """The config's fields that change training, as JSON values."""
    fields = config.model_dump(mode="json")
    return {k: v for k, v in fields.items() if k not in INFERENCE_ONLY_FIELDS}


def model_folder_name(scan_fingerprint: str, *, reference: str, config: CCSTAEConfig) -> str:
    """Name of the folder, under a run's work folder, that holds the model trained on a scan:
    ``ccstae-model-`` and 12 hex digits of the SHA-256 of the scan
    (:func:`~stemlib.ccstae.data.data_fingerprint`), the reference region and the config's
    training fields (all but :data:`INFERENCE_ONLY_FIELDS`). A rerun that changes only
    inference finds the trained model; one that changes training gets a folder of its own.

    Examples
    --------
    >>> cpu = CCSTAEConfig.preset("cpu")
    >>> def name(**change):
    ...     return model_folder_name("1f2e", reference="auto", config=cpu.model_copy(update=change))
    >>> name().startswith("ccstae-model-"), name() == name(refine_steps=2), name() == name(epochs=3)
    (True, True, False)
    """
    key = fingerprint(
        {"scan": scan_fingerprint, "reference": reference, "config": _training_fields(config)}
    )
    return f"ccstae-model-{key[:12]}"


def model_folder(
    work: Location,
    scan_fingerprint: str,
    *,
    reference: str,
    config: CCSTAEConfig,
    anew: bool = False,
) -> str:
    """URL of the folder in a run's work folder that holds the model trained on a scan.

    Parameters
    ----------
    work
        The run's work folder (:func:`stemlib.io.storage.work_folder`): local or on object
        storage.
    scan_fingerprint, reference, config
        As :func:`model_folder_name`, which names the folder.
    anew
        Remove the folder first (a recompute): training starts anew, neither resuming from a
        checkpoint found there nor taking it as trained.

    Returns
    -------
    str
        The folder's URL (a path when local).
    """
    folder = work.child(model_folder_name(scan_fingerprint, reference=reference, config=config))
    if anew:
        remove(folder)
    return folder.url


@dataclass
class Checkpoint:
    """A training record: the weights and everything needed to trust or resume them.

    Attributes
    ----------
    config : dict
        The :class:`CCSTAEConfig` (JSON form).
    seed : int
    data_fingerprint : str
        The scan's identity (:func:`stemlib.ccstae.data.data_fingerprint`).
    setup : dict
        Data-derived settings: pattern shape, centre, intensity scale, mask schedule.
    epoch : int
        Epochs completed.
    model, optimizer, scheduler : dict
        State dicts.
    history : list of dict
        Per-epoch metrics (loss, patterns/s, skipped batches, mask radii, seconds).
    versions : dict
        Software versions; ``created``: UTC time of the last save.
    """

    config: dict[str, Any]
    seed: int
    data_fingerprint: str
    setup: dict[str, Any]
    epoch: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    running_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=software_versions)
    created: str = field(default_factory=utc_now)

    def save(self, workdir: str | Path) -> Path:
        """Write ``workdir/checkpoint.pt`` whole or not at all
        (:func:`stemlib.io.storage.staged_file`); returns its path. Serialised in memory first:
        PyTorch's writer reports a full disk as a ``RuntimeError`` of its zip archive, a
        file's write as the ``OSError`` that names it."""
        path = Path(workdir) / CHECKPOINT_NAME
        self.created = utc_now()
        buffer = io.BytesIO()
        torch.save(self.__dict__, buffer)
        with staged_file(path) as temp:
            temp.write_bytes(buffer.getbuffer())
        return path

    @classmethod
    def load(cls, workdir: str | Path) -> Checkpoint | None:
        """The checkpoint in ``workdir``, or None if there is none."""
        path = Path(workdir) / CHECKPOINT_NAME
        if not path.exists():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=False)
            return cls(**record)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
            raise InputError(
                f"{path} is not a readable CC-ST-AE checkpoint ({type(exc).__name__}); delete "
                f"it or pass another workdir."
            ) from None

    def check_matches(self, *, config: CCSTAEConfig, data_fingerprint: str, where: str) -> None:
        """Refuse to resume a checkpoint of another scan or another training recipe.

        Raises
        ------
        InputError
            Naming the differing fields and the fix.
        """
        if self.data_fingerprint != data_fingerprint:
            raise InputError(
                f"{where} holds a checkpoint trained on another scan; pass an empty workdir for "
                f"this scan."
            )
        mine = _training_fields(config)
        differ = sorted(k for k in mine if mine[k] != self.config.get(k))
        if differ:
            raise InputError(
                f"{where} holds a checkpoint trained with other settings ({', '.join(differ)}); "
                "pass an empty workdir or the config it was trained with."
            )

    def file_sha256(self, workdir: str | Path) -> str:
        """SHA-256 of the saved checkpoint file (the model's identity in a result's provenance)."""
        return hashlib.sha256((Path(workdir) / CHECKPOINT_NAME).read_bytes()).hexdigest()


def _cosine(total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def train(
    model: CCSTAE,
    stream: PatternStream,
    *,
    config: CCSTAEConfig,
    schedule: MaskSchedule,
    device: torch.device,
    record: Checkpoint,
    workdir: str | Path | None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    slice_size: int | None = None,
) -> Checkpoint:
    """Train ``model`` for ``config.epochs`` epochs from ``record.epoch``.

    Parameters
    ----------
    model
        The model, on ``device``; its weights are loaded from ``record`` when it holds some.
    stream
        Shuffled training batches (its ``epoch`` is set here).
    config
        Recipe (epochs, lr, outlier factor, amp, compile, workers).
    schedule
        Ring radii per epoch.
    device
        Where to train.
    record
        The checkpoint to resume from (``epoch`` 0 and empty states for a fresh run); updated.
    workdir
        Where checkpoints are written after each epoch (None: not written).
    progress
        Called after each epoch with that epoch's metrics (also logged on ``stemlib.ccstae``).
    slice_size
        Patterns per forward and backward pass: a larger batch is passed in slices whose
        gradients are summed, the same step as one pass but in a slice's memory
        (:func:`stemlib.ccstae.memory.batch_that_fits`), at the cost of one more forward pass
        without gradients (the batch's loss, which decides an outlier batch and the robust
        mean's threshold). None: the whole batch at once.

    Returns
    -------
    Checkpoint
        ``record``, updated to the last epoch.
    """
    decoder = set(id(p) for p in model.decoder.parameters())
    others = [p for p in model.parameters() if id(p) not in decoder]
    optimizer = torch.optim.Adam(
        [
            {"params": others},
            {"params": list(model.decoder.parameters()), "lr": config.lr * config.base_lr_factor},
        ],
        lr=config.lr,
    )
    steps_per_epoch = len(stream)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine(config.epochs * steps_per_epoch)
    )
    if record.model:
        model.load_state_dict(record.model)
    if record.optimizer:  # absent after a run of 0 epochs (the template and rotation stages only)
        optimizer.load_state_dict(record.optimizer)
        scheduler.load_state_dict(record.scheduler)
    forward = torch.compile(model) if config.compile and accelerated(device) else model
    shape = tuple(stream.data.shape[2:])
    beam = model.center  # the loss's warp centre, read once (on CUDA a read waits for the GPU)
    running = record.running_loss
    for epoch in range(record.epoch, config.epochs):
        model.train()
        stream.epoch = epoch
        center = None
        if schedule.recenter:
            with torch.no_grad():
                center = schedule.center_from(model.bases()[0, 0].float().cpu().numpy())
        mask = torch.from_numpy(schedule.mask(shape, epoch, center)).float().to(device)
        total, count, skipped, start = 0.0, 0, 0, time.perf_counter()
        for batch in loader(stream, num_workers=config.num_workers, device=device):
            x = batch["pattern"].to(device, non_blocking=True)
            theta0 = batch["theta0"].to(device, non_blocking=True)
            shift0 = batch["shift0"].to(device, non_blocking=True)
            value, backward = _step_loss(
                forward, x, theta0, shift0, mask, config, center=beam, slice_size=slice_size
            )
            outlier = running is not None and value > config.outlier_factor * running
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(value) or outlier:
                skipped += 1
                scheduler.step()
                continue
            backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            running = value if running is None else 0.95 * running + 0.05 * value
            total += value * x.shape[0]
            count += x.shape[0]
        seconds = time.perf_counter() - start
        metrics = {
            "epoch": epoch + 1,
            "loss": total / max(count, 1),
            "patterns_per_s": count / max(seconds, 1e-9),
            "seconds": seconds,
            "skipped_batches": skipped,
            "mask_radii": list(schedule.radii(epoch)),
            "lr": scheduler.get_last_lr()[0],
        }
        record.history.append(metrics)
        record.epoch = epoch + 1
        record.running_loss = running
        record.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        record.optimizer = optimizer.state_dict()
        record.scheduler = scheduler.state_dict()
        if workdir is not None:
            record.save(workdir)
        log.info(
            "epoch %d/%d  loss %.5g  %.0f patterns/s  skipped %d",
            epoch + 1,
            config.epochs,
            metrics["loss"],
            metrics["patterns_per_s"],
            skipped,
        )
        if progress is not None:
            progress(metrics)
    return record


def _step_loss(
    forward: Callable[..., Any],
    x: torch.Tensor,
    theta0: torch.Tensor,
    shift0: torch.Tensor,
    mask: torch.Tensor,
    config: CCSTAEConfig,
    *,
    center: tuple[float, float],
    slice_size: int | None,
) -> tuple[float, Callable[[], None]]:
    """A training step's loss value and the function that puts its gradient in the model's
    ``.grad``: one forward pass with gradients when the batch ``x`` (B, 1, H, W) is no larger
    than ``slice_size``, else a forward pass without them for the value and the robust mean's
    threshold, then a forward and backward pass per slice (:func:`cycle_loss` of each slice
    sums to the batch's)."""
    n = len(x)
    if slice_size is None or n <= slice_size:
        with mixed_precision(x.device, config.amp):
            out = forward(x, theta0, shift0)
        loss = cycle_loss(out, x.float(), mask, config, center=center).total
        return float(loss.detach()), loss.backward
    parts = [slice(start, start + slice_size) for start in range(0, n, slice_size)]
    with torch.no_grad():
        pieces = []
        for part in parts:
            with mixed_precision(x.device, config.amp):
                out = forward(x[part], theta0[part], shift0[part])
            pieces.append(cycle_loss(out, x[part].float(), mask, config, center=center, batch=n))
    per_pattern = torch.cat([piece.per_pattern for piece in pieces])
    tau = outlier_threshold(per_pattern, config.outlier_factor)
    value = robust_mean(per_pattern, config.outlier_factor, tau=tau) + sum(
        piece.l1 + piece.hinge for piece in pieces
    )

    def backward() -> None:
        for part in parts:
            with mixed_precision(x.device, config.amp):
                out = forward(x[part], theta0[part], shift0[part])
            xs = x[part].float()
            cycle_loss(out, xs, mask, config, center=center, batch=n, tau=tau).total.backward()

    return float(value), backward


def seeded(seed: int) -> None:
    """Seed torch and NumPy's legacy generator for a reproducible model initialisation."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
