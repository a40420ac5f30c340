"""4D views of the frames of scans stored frame after frame: at byte offsets (TIA, TVIPS) or
in HDF5 datasets (ARINA, Velox)."""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from ....errors import InputError
from ..base import as_slice

__all__ = ["FrameTable", "HDF5Frames"]


class _Frames:
    """A 4D view (RX, RY, QX, QY) of the frames of a scan stored frame after frame.

    Subclasses implement ``_frames(start, stop)``: frames ``start:stop`` (flat C-order position
    index) as an array (n, QX, QY). Slicing a block reads one run of frames per scan row.
    The object holds file names only (files are opened in each call), so it is picklable.
    """

    def __init__(
        self, *, scan_shape: tuple[int, int], frame_shape: tuple[int, int], dtype: Any
    ) -> None:
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.shape = self.scan_shape + self.frame_shape
        self.ndim = 4
        self.dtype = np.dtype(dtype)

    def _frames(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (4 - len(key))
        rows, cols = (as_slice(k, n) for k, n in zip(key[:2], self.scan_shape, strict=True))
        r0, r1, _ = rows.indices(self.scan_shape[0])
        c0, c1, _ = cols.indices(self.scan_shape[1])
        ry = self.scan_shape[1]
        block = np.empty((max(r1 - r0, 0), max(c1 - c0, 0)) + self.frame_shape, self.dtype)
        for i, r in enumerate(range(r0, r1)):
            if c1 > c0:
                block[i] = self._frames(r * ry + c0, r * ry + c1)
        squeeze = tuple(i for i, k in enumerate(key[:2]) if isinstance(k, (int, np.integer)))
        block = block[(slice(None), slice(None)) + tuple(key[2:])]
        return block.squeeze(axis=squeeze) if squeeze else block


class FrameTable(_Frames):
    """Frames at known byte offsets in one or more local files (TIA, TVIPS).

    ``files[file_of[i]]`` holds frame ``i`` at byte ``offsets[i]``, stored as ``file_dtype``
    (with its byte order), rows bottom-up if ``flip_rows``. Offsets increase within a file.
    """

    def __init__(
        self,
        files: list[str],
        file_of: np.ndarray,
        offsets: np.ndarray,
        *,
        scan_shape: tuple[int, int],
        frame_shape: tuple[int, int],
        file_dtype: Any,
        flip_rows: bool = False,
    ) -> None:
        self.file_dtype = np.dtype(file_dtype)
        super().__init__(
            scan_shape=scan_shape, frame_shape=frame_shape, dtype=self.file_dtype.newbyteorder("=")
        )
        self.files = list(files)
        self.file_of = np.asarray(file_of, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.flip_rows = flip_rows
        self.frame_bytes = int(np.prod(self.frame_shape)) * self.file_dtype.itemsize

    def _frames(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start,) + self.frame_shape, self.dtype)
        index = np.arange(start, stop)
        # Runs of consecutive frames in the same file are read with one call each.
        for run in np.split(index, np.flatnonzero(np.diff(self.file_of[index])) + 1):
            first, last = int(self.offsets[run[0]]), int(self.offsets[run[-1]]) + self.frame_bytes
            path = self.files[self.file_of[run[0]]]
            with open(path, "rb") as f:
                buffer = os.pread(f.fileno(), last - first, first)
            if len(buffer) < last - first:
                raise InputError(
                    f"{path} became shorter while it was read; check that nothing is writing to it."
                )
            for i, frame in zip(run - start, run, strict=True):
                pixels = np.frombuffer(
                    buffer,
                    self.file_dtype,
                    int(np.prod(self.frame_shape)),
                    int(self.offsets[frame]) - first,
                ).reshape(self.frame_shape)
                out[i] = pixels[::-1] if self.flip_rows else pixels
        return out


class HDF5Frames(_Frames):
    """Frames in one or more HDF5 datasets (ARINA data files, a Velox stack), read by HDF5 slices.

    ``parts`` lists ``(file, dataset, frames)`` in scan order; frames are along the first
    axis of each dataset, or the last with ``frames_last`` (Velox stores (QX, QY, N)).
    """

    def __init__(
        self, parts: list[tuple[str, str, int]], *, frames_last: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.parts = list(parts)
        self.frames_last = frames_last
        self.starts = np.cumsum([0] + [n for _, _, n in parts])

    def _frames(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        for k, (path, dataset, _) in enumerate(self.parts):
            a, b = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if a < b:
                window = slice(int(a - self.starts[k]), int(b - self.starts[k]))
                with h5py.File(path, "r") as f:
                    ds = f[dataset]
                    pieces.append(
                        np.moveaxis(ds[:, :, window], 2, 0) if self.frames_last else ds[window]
                    )
        return np.concatenate(pieces).astype(self.dtype, copy=False)
