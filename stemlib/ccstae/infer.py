"""Inference: each pattern's class, affine warp and reconstruction error, streamed from a scan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..progress import Counter, Report
from .affine import rotation
from .data import PatternStream, loader
from .model import CCSTAE, mixed_precision
from .refine import (
    disk_regions,
    masked_error,
    radial_background,
    refine_affine,
    rigid_disk_model,
)

__all__ = ["Inference", "infer"]


@dataclass
class Inference:
    """Per-position results of :func:`infer` (RX x RY positions).

    Attributes
    ----------
    matrix : ndarray of shape (RX, RY, 2, 2)
        ``A``, the warp base -> pattern in the (qx, qy) frame (:mod:`stemlib.ccstae.affine`).
    shift : ndarray of shape (RX, RY, 2)
        ``t`` in px (qx, qy).
    network_matrix : ndarray of shape (RX, RY, 2, 2)
        ``A`` as the network gave it, before refinement.
    class_map : ndarray of shape (RX, RY), int
        Index of each pattern's base.
    error : ndarray of shape (RX, RY)
        Masked mean squared difference between the pattern and its base warped onto it, in the
        preprocessed intensity units.
    gain : ndarray of shape (RX, RY)
        Intensity of the pattern relative to its base.
    """

    matrix: np.ndarray
    shift: np.ndarray
    network_matrix: np.ndarray
    class_map: np.ndarray
    error: np.ndarray
    gain: np.ndarray


@torch.no_grad()
def infer(
    model: CCSTAE,
    stream: PatternStream,
    *,
    mask: torch.Tensor,
    device: torch.device,
    refine_steps: int,
    poisson: bool = False,
    background: bool = True,
    disk_gains: bool = False,
    rigid_disks: bool = False,
    inner: float = 0.0,
    disk_radius: float = 3.0,
    num_workers: int = 0,
    amp: bool = True,
    neighbour_starts: bool = True,
    report: Report | None = None,
) -> Inference:
    """Run the model over every pattern of ``stream`` and refine each warp against its base.

    Parameters
    ----------
    model
        A trained model on ``device``.
    stream
        Unshuffled batches covering the scan.
    mask
        Float tensor of shape (H, W): the last epoch's ring.
    device
        Where to run.
    refine_steps
        Gauss-Newton iterations per pattern (:func:`stemlib.ccstae.refine.refine_affine`); 0 keeps
        the network's warp.
    poisson
        Refine by Poisson likelihood (linear count data at low dose).
    background
        Refine with the bases' isotropic background fitted but not warped.
    disk_gains
        Give every Bragg disk of a base its own gain in the refinement
        (:func:`stemlib.ccstae.refine.disk_regions`).
    rigid_disks
        Move each Bragg disk of a base rigidly with the lattice in the refinement, rather than
        stretching it with the pattern (``disks`` of :func:`stemlib.ccstae.refine.refine_affine`).
    inner
        Inner radius (px) of the ring: disks inside it are not labelled.
    disk_radius
        Radius (px) of the Bragg disks (the direct beam's).
    num_workers
        DataLoader workers.
    amp
        bf16 autocast for the network on CUDA.
    neighbour_starts
        Refine every pattern a second time, from the median warp of its eight neighbours, and
        keep whichever fit reaches the lower objective. Each answer is still that pattern's own
        fit; only the start is shared. At low dose the likelihood has local minima near the
        network's start, and a grain's neighbours start closer to the truth.
    report
        Takes a line of progress at each quarter of the scan, in each pass
        (:class:`stemlib.progress.Counter`); None: no progress.

    Returns
    -------
    Inference
    """
    model.eval()
    rx, ry = stream.data.shape[:2]
    n = rx * ry
    matrix = np.full((n, 2, 2), np.nan)
    network_matrix = np.full((n, 2, 2), np.nan)
    shift = np.full((n, 2), np.nan)
    class_map = np.full(n, -1, np.int64)
    error = np.full(n, np.nan)
    gain = np.full(n, np.nan)
    objective = np.full(n, np.inf)
    bases = model.bases().float()
    center = model.center  # read once (on CUDA a read waits for the GPU)
    bg = radial_background(bases, center=center) if background else torch.zeros_like(bases)
    found = dict(center=center, inner=inner, disk_radius=disk_radius)
    disks = rigid_disk_model(bases - bg, **found) if rigid_disks else None
    regions = None
    if disk_gains:
        regions = disks[0] if disks is not None else disk_regions(bases - bg, **found)
    mask = mask.to(device)

    def refine(
        x: torch.Tensor, cls: torch.Tensor, A: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Each pattern of ``x`` registered onto its class's base from the warp ``A``, ``t``."""
        return refine_affine(
            x,
            (bases - bg)[cls],
            A,
            t,
            mask,
            center=center,
            steps=refine_steps,
            poisson=poisson,
            background=bg[cls] if background else None,
            regions=None if regions is None else regions[cls],
            disks=None if disks is None else (disks[0][cls], disks[1][cls]),
        )

    counter = Counter(report, "ccstae: inference", n)
    for batch in loader(stream, num_workers=num_workers, device=device):
        x = batch["pattern"].to(device, non_blocking=True)
        theta0 = batch["theta0"].to(device, non_blocking=True)
        shift0 = batch["shift0"].to(device, non_blocking=True)
        with mixed_precision(device, amp):
            code, affine = model.encode(x, theta0, shift0)
        A, t = affine.matrix().float(), affine.shift.float()
        cls = code.argmax(-1)
        if len(bases) > 1:
            # The class whose base, warped onto the pattern, explains it best (the cycle loss
            # decides; the K-sparse code is its amortised guess).
            errors = torch.stack(
                [
                    masked_error(x.float(), b.expand(len(x), -1, -1, -1), A, t, mask, center=center)
                    for b in bases
                ],
                1,
            )
            cls = errors.argmin(1)
        base = bases[cls]
        idx = batch["index"].numpy()
        network_matrix[idx] = A.cpu().numpy()
        if refine_steps > 0:
            # Start each refinement from the network's warp or from the rotation stage's,
            # whichever fits better: an undertrained network must not make the start worse.
            A0, t0 = rotation(theta0.float()), shift0.float()
            worse = masked_error(x.float(), base, A, t, mask, center=center) > masked_error(
                x.float(), base, A0, t0, mask, center=center
            )
            A = torch.where(worse[:, None, None], A0, A)
            t = torch.where(worse[:, None], t0, t)
            fit = refine(x, cls, A, t)
            A, t, err, g = fit["matrix"], fit["shift"], fit["error"], fit["gain"]
            objective[idx] = fit["objective"].cpu().numpy()
        else:
            err, g = (
                masked_error(x.float(), base, A, t, mask, center=center),
                torch.ones_like(cls, dtype=torch.float32),
            )
        matrix[idx] = A.cpu().numpy()
        shift[idx] = t.cpu().numpy()
        class_map[idx] = cls.cpu().numpy()
        error[idx] = err.cpu().numpy()
        gain[idx] = g.cpu().numpy()
        counter.add(len(idx))
    if refine_steps > 0 and neighbour_starts:
        start_A = _neighbour_median(matrix.reshape(rx, ry, 2, 2)).reshape(n, 2, 2)
        start_t = _neighbour_median(shift.reshape(rx, ry, 1, 2)).reshape(n, 2)
        counter = Counter(report, "ccstae: inference from the neighbours' warps", n)
        for batch in loader(stream, num_workers=num_workers, device=device):
            idx = batch["index"].numpy()
            ok = np.isfinite(start_A[idx]).all(axis=(1, 2))
            if not ok.any():
                counter.add(len(idx))
                continue
            idx = idx[ok]
            x = batch["pattern"][torch.from_numpy(ok)].to(device)
            cls = torch.from_numpy(class_map[idx]).to(device)
            A = torch.from_numpy(start_A[idx]).float().to(device)
            t = torch.from_numpy(start_t[idx]).float().to(device)
            fit = refine(x, cls, A, t)
            better = fit["objective"].cpu().numpy() < objective[idx]
            pick = idx[better]
            matrix[pick] = fit["matrix"].cpu().numpy()[better]
            shift[pick] = fit["shift"].cpu().numpy()[better]
            error[pick] = fit["error"].cpu().numpy()[better]
            gain[pick] = fit["gain"].cpu().numpy()[better]
            objective[pick] = fit["objective"].cpu().numpy()[better]
            counter.add(len(batch["index"]))
    return Inference(
        matrix=matrix.reshape(rx, ry, 2, 2),
        shift=shift.reshape(rx, ry, 2),
        network_matrix=network_matrix.reshape(rx, ry, 2, 2),
        class_map=class_map.reshape(rx, ry),
        error=error.reshape(rx, ry),
        gain=gain.reshape(rx, ry),
    )


def _neighbour_median(values: np.ndarray) -> np.ndarray:
    """Median of each position's eight neighbours, NaN-aware: warps (RX, RY, 2, 2) after turning
    each neighbour's onto the branch nearest the position's own (a base is the same turned by
    its lattice's symmetry: multiples of 30 deg cover 2-, 4- and 6-fold), or shifts (RX, RY, 1, 2).
    """
    rx, ry = values.shape[:2]
    padded = np.pad(values, ((1, 1), (1, 1), (0, 0), (0, 0)), constant_values=np.nan)
    around = np.stack(
        [
            padded[1 + i : 1 + i + rx, 1 + j : 1 + j + ry]
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            if (i, j) != (0, 0)
        ]
    )  # (8, RX, RY, a, 2)
    if values.shape[-2:] == (2, 2):
        angles = np.radians(np.arange(0, 360, 30))
        turns = np.stack(
            [
                np.stack([np.cos(angles), -np.sin(angles)], -1),
                np.stack([np.sin(angles), np.cos(angles)], -1),
            ],
            -2,
        )  # (12, 2, 2)
        turned = np.einsum("nxyab,kbc->knxyac", around, turns)  # (12, 8, RX, RY, 2, 2)
        distance = np.abs(turned - values[None, None]).sum(axis=(-1, -2))
        best = np.nanargmin(np.where(np.isnan(distance), np.inf, distance), axis=0)
        around = np.take_along_axis(turned, best[None, ..., None, None], axis=0)[0]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neighbourhoods stay NaN
        return np.nanmedian(around, axis=0)
