"""Patterns streamed from a scan for training and inference, never the whole scan in memory.

A scan is a lazy array of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2), usually the
dask array of :func:`stemlib.io.open_scan`. :class:`PatternStream` reads it one scan block (a
dask chunk) at a time, inside DataLoader worker processes when asked, and yields batches of
preprocessed patterns with their flat indices ``rx * RY + ry``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import multiprocessing.context
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import InputError
from ..io.scan_store import finite_counts
from ..resources import usable_cores
from ..scan import stored_content

__all__ = [
    "Preprocess",
    "PatternStream",
    "as_dask",
    "loader",
    "data_fingerprint",
    "sample_patterns",
]

log = logging.getLogger("stemlib.ccstae")


def as_dask(scan: Any) -> da.Array:
    """The scan as a 4D dask array (from an xarray DataArray, a dask or a NumPy array).

    Raises
    ------
    InputError
        If it does not have 4 dims (rx, ry, qx, qy).
    """
    data = finite_counts(scan) if isinstance(scan, xr.DataArray) else scan
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(16, 16, -1, -1))
    if data.ndim != 4:
        raise InputError(
            f"the scan has shape {data.shape}; expected 4 dims (rx, ry, qx, qy): open it with "
            f"stemlib.io.open_scan."
        )
    if data.chunks[2] != (data.shape[2],) or data.chunks[3] != (data.shape[3],):
        data = data.rechunk({2: -1, 3: -1})
    return data


@dataclass(frozen=True)
class Preprocess:
    """Per-pattern intensity normalisation: divide by the pattern's mean, transform, divide by
    ``scale``.

    ``intensity``: ``"sqrt"`` (stabilises Poisson noise), ``"log"`` (``log1p``) or ``"linear"``.
    Input: array of shape (n, H, W) in any dtype; output float32 of the same shape.
    """

    intensity: Literal["sqrt", "linear", "log"] = "sqrt"
    scale: float = 1.0

    def __call__(self, patterns: np.ndarray) -> np.ndarray:
        x = np.asarray(patterns, dtype=np.float32)
        mean = x.mean(axis=(-2, -1), keepdims=True)
        x = np.clip(x / np.where(mean > 0, mean, 1.0), 0.0, None)
        if self.intensity == "sqrt":
            x = np.sqrt(x)
        elif self.intensity == "log":
            x = np.log1p(x)
        return x / np.float32(self.scale)


def _blocks(data: da.Array) -> list[tuple[slice, slice]]:
    """(rx, ry) slices of the scan's dask chunks, in C order."""
    out = []
    rx0 = 0
    for crx in data.chunks[0]:
        ry0 = 0
        for cry in data.chunks[1]:
            out.append((slice(rx0, rx0 + crx), slice(ry0, ry0 + cry)))
            ry0 += cry
        rx0 += crx
    return out


def _read(data: da.Array, block: tuple[slice, slice]) -> np.ndarray:
    with dask.config.set(scheduler="synchronous"):
        return np.asarray(data[block].compute())


class PatternStream(IterableDataset):
    """Batches of preprocessed patterns read block by block from a lazy scan.

    Parameters
    ----------
    data
        Dask array of shape (RX, RY, QX, QY).
    preprocess
        Applied to each block as it is read.
    batch_size
        Patterns per batch (the last batch of a pass may be smaller).
    shuffle
        Shuffle blocks and patterns (training); the order depends on ``seed`` and ``epoch`` only.
    seed
        Seed of the shuffling.
    theta0
        Array of shape (RX, RY), rad: the rotation search's angle of each pattern (zeros if None).
    shift0
        Array of shape (RX, RY, 2), px: each pattern's direct beam minus the nominal centre
        (descan; zeros if None).
    indices
        Flat indices (``rx * RY + ry``) to stream; all if None.

    Yields
    ------
    dict
        ``pattern`` float32 tensor (b, 1, QX, QY); ``index`` int64 (b,); ``theta0`` float32 (b,);
        ``shift0`` float32 (b, 2).

    Notes
    -----
    Set :attr:`epoch` before iterating to change the shuffle; DataLoader workers each read a
    disjoint share of the blocks. Memory: one block (a dask chunk) per worker and a shuffle
    buffer of two blocks.
    """

    def __init__(
        self,
        data: da.Array,
        preprocess: Preprocess,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        theta0: np.ndarray | None = None,
        shift0: np.ndarray | None = None,
        indices: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.data = data
        self.preprocess = preprocess
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        rx, ry = data.shape[:2]
        self.theta0 = (
            np.zeros((rx, ry), np.float32) if theta0 is None else np.asarray(theta0, np.float32)
        )
        self.shift0 = (
            np.zeros((rx, ry, 2), np.float32) if shift0 is None else np.asarray(shift0, np.float32)
        )
        self.indices = None if indices is None else np.unique(np.asarray(indices, np.int64))

    def __len__(self) -> int:
        n = int(np.prod(self.data.shape[:2])) if self.indices is None else len(self.indices)
        return math.ceil(n / self.batch_size)

    def _my_blocks(self) -> list[tuple[slice, slice]]:
        blocks = _blocks(self.data)
        if self.indices is not None:
            ry = self.data.shape[1]
            rows, cols = self.indices // ry, self.indices % ry
            blocks = [
                b
                for b in blocks
                if np.any(
                    (rows >= b[0].start)
                    & (rows < b[0].stop)
                    & (cols >= b[1].start)
                    & (cols < b[1].stop)
                )
            ]
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks))
            blocks = [blocks[i] for i in order]
        info = get_worker_info()
        if info is not None:
            blocks = blocks[info.id :: info.num_workers]
        return blocks

    def _emit(
        self, patterns: np.ndarray, index: np.ndarray, rng: np.random.Generator | None
    ) -> Iterator[dict[str, torch.Tensor]]:
        if rng is not None:
            order = rng.permutation(len(index))
            patterns, index = patterns[order], index[order]
        ry = self.data.shape[1]
        for start in range(0, len(index), self.batch_size):
            idx = index[start : start + self.batch_size]
            yield {
                "pattern": torch.from_numpy(
                    np.ascontiguousarray(patterns[start : start + self.batch_size])
                )[:, None],
                "index": torch.from_numpy(idx),
                "theta0": torch.from_numpy(self.theta0[idx // ry, idx % ry]),
                "shift0": torch.from_numpy(self.shift0[idx // ry, idx % ry]),
            }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng([self.seed, self.epoch, worker, 1]) if self.shuffle else None
        ry = self.data.shape[1]
        held_p: list[np.ndarray] = []
        held_i: list[np.ndarray] = []
        for block in self._my_blocks():
            rows = np.arange(block[0].start, block[0].stop)
            cols = np.arange(block[1].start, block[1].stop)
            index = (rows[:, None] * ry + cols[None, :]).ravel()
            patterns = self.preprocess(
                _read(self.data, block).reshape(len(index), *self.data.shape[2:])
            )
            if self.indices is not None:
                keep = np.isin(index, self.indices)
                patterns, index = patterns[keep], index[keep]
            if rng is None:
                yield from self._emit(patterns, index, None)
                continue
            held_p.append(patterns)
            held_i.append(index)
            if len(held_p) == 2:  # shuffle across two blocks, emit whole batches, keep the rest
                p, i = np.concatenate(held_p), np.concatenate(held_i)
                order = rng.permutation(len(i))
                p, i = p[order], i[order]
                cut = len(i) // 2 // self.batch_size * self.batch_size or len(i)
                yield from self._emit(p[:cut], i[:cut], None)
                held_p, held_i = ([p[cut:]], [i[cut:]]) if cut < len(i) else ([], [])
        if held_p:
            yield from self._emit(np.concatenate(held_p), np.concatenate(held_i), rng)


#: Imported once by the forkserver that starts the DataLoader workers, so that each worker
#: of every later pass starts with them loaded.
WORKER_PRELOAD = ["stemlib.ccstae.data", "zarr"]


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a forkserver, a clean process, not a fork of this one: Prefect, zarr
    and dask keep threads here, which can crash or deadlock a forked child. The server imports
    :data:`WORKER_PRELOAD` once; without that every worker imported torch, dask and zarr
    itself, and each pass (an epoch, an inference pass) waited for it. Measured on 2 cores, two
    workers over 16,384 patterns: the first batch came after 5.1-5.2 s in every pass, and
    after 2.6 s in the first pass and 0.4 s in each later one with the preload."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def loader(stream: PatternStream, *, num_workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over ``stream`` (batches already formed) with pinned memory on CUDA.

    At most one worker process per core this process may use
    (:func:`stemlib.resources.usable_cores`): the gpu preset's 4 on a 2-core machine made
    PyTorch warn twice per pass that they may run slowly or freeze. A daemonic process may not
    start worker processes (a Dask worker under ``distributed.worker.daemon: true``,
    distributed's default, which stemflow's own clusters turn off): there the patterns are read
    in the process itself, with a warning."""
    num_workers = min(num_workers, usable_cores())
    if num_workers and multiprocessing.current_process().daemon:
        log.warning(
            "reading patterns without DataLoader workers: this process is daemonic (a Dask "
            "worker with distributed.worker.daemon true) and may not start them; set "
            "distributed.worker.daemon: false on the workers to use %d",
            num_workers,
        )
        num_workers = 0
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        multiprocessing_context=_worker_context() if num_workers else None,
    )


def sample_patterns(
    data: da.Array, *, n: int, seed: int, include: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` raw patterns drawn at random over the scan, plus the positions ``include``.

    Returns float32 patterns of shape (n', QX, QY) and their flat indices (n',), sorted. Blocks
    are read one at a time, only those holding a drawn position.
    """
    rx, ry = data.shape[:2]
    pick = np.random.default_rng(seed).choice(rx * ry, size=min(n, rx * ry), replace=False)
    if include is not None:
        pick = np.concatenate([pick, np.asarray(include, np.int64).ravel()])
    pick = np.unique(pick)
    rows, cols = pick // ry, pick % ry
    out = np.empty((len(pick), *data.shape[2:]), np.float32)
    for block in _blocks(data):
        inside = (
            (rows >= block[0].start)
            & (rows < block[0].stop)
            & (cols >= block[1].start)
            & (cols < block[1].stop)
        )
        if inside.any():
            values = _read(data, block)
            out[inside] = values[rows[inside] - block[0].start, cols[inside] - block[1].start]
    return out, pick


def data_fingerprint(scan: Any) -> str:
    """A stable identity of a scan: its store's ``content_sha256`` for the store's patterns as
    read (:func:`stemlib.scan.stored_content`), else a hash of shape, dtype and a few
    patterns."""
    content = stored_content(scan)
    if content:
        return content
    data = as_dask(scan)
    h = hashlib.sha256(f"{data.shape}{data.dtype}".encode())
    rx, ry = data.shape[:2]
    with dask.config.set(scheduler="synchronous"):
        for i, j in ((0, 0), (rx // 2, ry // 2), (rx - 1, ry - 1)):
            h.update(np.ascontiguousarray(np.asarray(data[i, j].compute())).tobytes())
    return h.hexdigest()
