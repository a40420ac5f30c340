"""The starting bases: sharp templates learned from a sample of the scan before the network trains.

A base learned by gradient descent from unaligned patterns starts as their blurred mean, and a
blurred base pulls every registration towards it (the disks slide inside wide blobs), so that
the alignment and the base sharpen only slowly together. This stage starts instead from the
mean of the reference region's patterns (or, without a reference, of the sample patterns that
are most alike), turned to a common orientation by the rotation stage: one strain state, sharp
disks, and the reference's lattice, which the later steps keep (each pattern is registered
onto the base). A base with the reference's lattice matters for the strain: a pattern matched
to the base through a symmetry operation ``S`` gives ``F_b = F S F_base^-1``, which differs
from ``F F_base^-1`` only by a rotation when ``F_base`` is the (unstrained) reference. It then
alternates the two exact halves of
the cycle loss on the sample: every pattern is registered onto its base
(:func:`stemlib.ccstae.refine.refine_affine`), and each base becomes the masked mean of its
patterns warped onto it (:func:`stemlib.ccstae.refine.average_base`). With ``K > 1`` bases the
sample is first split by k-means (e.g. crystal and vacuum).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..progress import Report
from .affine import rotation, warp
from .refine import (
    average_base,
    radial_background,
    refine_affine,
    rigid_disk_model,
    solve_bases,
)

__all__ = ["densest_mean", "kmeans_labels", "learn_bases", "BLOCK"]

#: Patterns registered and solved at once by :func:`learn_bases`, where the device's memory holds
#: them (:func:`stemlib.ccstae.memory.template_block`).
BLOCK = 256


def _features(aligned: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Ring pixels of 4x average-pooled patterns, (n, D)."""
    pooled = F.avg_pool2d(aligned * ring, 4)
    keep = F.avg_pool2d(ring[None, None], 4)[0, 0] > 0
    return pooled[:, 0][:, keep]


def densest_mean(
    aligned: torch.Tensor, ring: torch.Tensor, *, k: int | None = None
) -> torch.Tensor:
    """Mean of the ``k + 1`` aligned patterns closest to the pattern whose ``k``-th neighbour is
    nearest (the densest spot of the sample). Input (n, 1, H, W); output (1, 1, H, W)."""
    n = aligned.shape[0]
    k = min(max(4, n // 16), 64, n - 1) if k is None else min(k, n - 1)
    if k < 1:
        return aligned.mean(0, keepdim=True)
    feats = _features(aligned, ring)
    dist = torch.cdist(feats, feats)
    near = dist.topk(k + 1, largest=False)
    centre = int(near.values[:, -1].argmin())
    return aligned[near.indices[centre]].mean(0, keepdim=True)


def kmeans_labels(
    aligned: torch.Tensor, ring: torch.Tensor, *, k: int, seed: int, iterations: int = 20
) -> torch.Tensor:
    """k-means (k-means++ seeding) of aligned patterns inside the ring: labels (n,) in [0, k),
    on the CPU whatever the patterns' device (as ``learn_bases``'s labels of one base are), and
    the same on every device: the seeding draws from a CPU generator."""
    feats = _features(aligned, ring).cpu()
    generator = torch.Generator().manual_seed(seed)
    centres = feats[torch.randint(len(feats), (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(feats, centres).min(1).values ** 2
        centres = torch.cat([centres, feats[torch.multinomial(d2 + 1e-12, 1, generator=generator)]])
    for _ in range(iterations):
        label = torch.cdist(feats, centres).argmin(1)
        centres = torch.stack(
            [feats[label == j].mean(0) if (label == j).any() else centres[j] for j in range(k)]
        )
    return torch.cdist(feats, centres).argmin(1)


def learn_bases(
    x: torch.Tensor,
    theta: torch.Tensor,
    ring: torch.Tensor,
    *,
    num_bases: int,
    center: tuple[float, float],
    start: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    rounds: int = 3,
    steps: int = 6,
    batch_size: int = BLOCK,
    seed: int = 0,
    poisson: bool = False,
    background: bool = False,
    solve: bool = True,
    disk_radius: float | None = None,
    inner: float = 0.0,
    report: Report | None = None,
) -> dict[str, torch.Tensor]:
    """Sharp starting bases from a sample of preprocessed patterns.

    Parameters
    ----------
    x
        Tensor of shape (n, 1, H, W): the sample.
    theta
        Tensor of shape (n,): each pattern's angle from the rotation stage (rad).
    ring
        Float tensor of shape (H, W): the loss's ring.
    num_bases
        ``K``.
    center
        (qx, qy) px.
    start
        Boolean tensor of shape (n,): the patterns to start the (main) base from, normally those
        of the reference region, so that the base has the reference's lattice; None: the
        densest spot of the sample.
    shift
        Tensor of shape (n, 2), px: each pattern's measured direct-beam offset (descan), the
        starting shift of its warp; zeros if None.
    rounds
        Register-then-average rounds.
    steps
        Gauss-Newton steps per registration.
    batch_size
        Patterns registered at once.
    seed
        Seed of the k-means.
    poisson
        Register by Poisson likelihood (:func:`stemlib.ccstae.refine.refine_affine`).
    background
        Split each base into its isotropic background (:func:`radial_background`), which is
        fitted but not warped, and the lattice part.
    solve
        After averaging, solve for the bases that best predict the patterns through their
        warps (:func:`stemlib.ccstae.refine.solve_bases`), which keeps small disks sharp. The
        solve reads the bases as the refinement does (finer Catmull-Rom grid, rigid disks with
        ``disk_radius``): solved through bilinear sampling and stretched disks, the demo's base
        put an offset of 0.4e-3 of exx and -0.03 deg on every strained grain against the
        reference grain; now 0.24e-3 and -0.02 deg.
    disk_radius
        Given, register and solve with each Bragg disk moved rigidly, as the inference does
        (``rigid_disks``): the radius (px) of the disks, found beyond ``inner`` px
        (:func:`stemlib.ccstae.refine.rigid_disk_model`).
    inner
        Inner radius (px) of the ring.
    report
        Takes a line of progress after each round; None: no progress.

    Returns
    -------
    dict
        ``bases`` (K, 1, H, W); ``labels`` (n,); ``matrix`` (n, 2, 2) and ``shift`` (n, 2): the
        sample's warps onto their bases.
    """
    n = x.shape[0]
    A = rotation(theta.float())
    t = x.new_zeros(n, 2) if shift is None else shift.float().clone()
    blocks = [slice(i, i + batch_size) for i in range(0, n, batch_size)]
    # warped a block at a time: a sampling grid is twice the patterns it samples
    aligned = torch.cat([warp(x[b], A[b], t[b], center=center) for b in blocks])
    labels = (
        torch.zeros(n, dtype=torch.long)
        if num_bases == 1
        else kmeans_labels(aligned, ring, k=num_bases, seed=seed)
    )
    starts = []
    main = (
        int(torch.bincount(labels[start], minlength=num_bases).argmax())
        if start is not None and start.any()
        else -1
    )
    for j in range(num_bases):
        members = labels == j
        if j == main:
            starts.append(aligned[members & start].mean(0, keepdim=True))
        elif members.sum() > 1:
            starts.append(densest_mean(aligned[members], ring))
        else:
            starts.append(aligned.mean(0, keepdim=True))
    bases = torch.cat(starts)
    del aligned, starts
    start_time = time.perf_counter()
    for round_ in range(rounds):
        bg = radial_background(bases, center=center) if background else torch.zeros_like(bases)
        lattice = bases - bg
        disks = (
            None
            if disk_radius is None
            else rigid_disk_model(lattice, center=center, inner=inner, disk_radius=disk_radius)
        )
        total = torch.zeros_like(bases)
        count = torch.zeros_like(bases)
        fits: list[dict[str, torch.Tensor]] = []
        for sl in blocks:
            fit = refine_affine(
                x[sl],
                lattice[labels[sl]],
                A[sl],
                t[sl],
                ring,
                center=center,
                steps=steps,
                poisson=poisson,
                background=bg[labels[sl]] if background else None,
                disks=None if disks is None else (disks[0][labels[sl]], disks[1][labels[sl]]),
            )
            fits.append(fit)
            A[sl], t[sl] = fit["matrix"], fit["shift"]
            unwarped = fit["level"][:, None, None, None] * bg[labels[sl]] if background else None
            for j in labels[sl].unique().tolist():
                pick = labels[sl] == j
                s, c = average_base(
                    x[sl][pick],
                    A[sl][pick],
                    t[sl][pick],
                    fit["gain"][pick],
                    fit["offset"][pick],
                    center=center,
                    unwarped=None if unwarped is None else unwarped[pick],
                )
                total[j] += s[0]
                count[j] += c[0]
        lattice = torch.where(count > 1e-6, total / count.clamp_min(1e-6), lattice)
        if solve:
            intensity = {
                k: torch.cat([f[k] for f in fits])
                for k in ("gain", "offset", *(("level",) if background else ()))
            }
            lattice = solve_bases(
                x,
                lattice,
                labels,
                A,
                t,
                intensity,
                ring,
                center=center,
                background=bg if background else None,
                disks=disks,
                batch_size=batch_size,
            )
        bases = lattice + bg
        if report is not None:
            report(
                f"ccstae: starting bases, round {round_ + 1}/{rounds} on {n:,} sampled patterns "
                f"({time.perf_counter() - start_time:.1f} s)"
            )
    return {"bases": bases, "labels": labels, "matrix": A, "shift": t}
