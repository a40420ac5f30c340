"""Per-pattern registration of patterns onto their base (Gauss-Newton), and the base it implies.

The network gives each pattern a warp in one pass, with the precision of an amortised
regression. :func:`refine_affine` then minimises, for each pattern separately, the input-frame
half of the cycle loss with the base fixed,

    sum_u m'(u) (g B(c + M (u - c) + d) + o - x(u))^2,

over the inverse warp ``M = A^-1``, ``d = -A^-1 t``, a gain ``g`` and an offset ``o`` (the
pattern's intensity relative to its base), ``m'`` being the ring mask carried by the warp. The
residual compares the base (smooth, learned from every pattern) with the data as recorded, so
noise is not interpolated. Gauss-Newton steps with a small Levenberg-Marquardt damping, using
the base's gradient images, converge in a few iterations; a pattern whose fit did not improve
keeps its starting warp. Between its pixels ``B`` is read from a finer Catmull-Rom copy
(:func:`catmull_rom_upsample`): read bilinearly from its own pixels it is only piecewise
linear, and the fit stopped in the valleys between the kinks.

A warp stretches the Bragg disks with the lattice, but a real disk is an image of the probe's
aperture: its size and shape do not change with the strain. With ``disks`` (the labels of
:func:`disk_regions` and the centres of :func:`disk_centres`), each disk instead moves rigidly
to where ``A`` takes its centre, turned with the lattice but not stretched. Measured on the
simulator's hardest settings with an exact base, stretching pulls the strain 6 % towards zero;
rigid disks leave no measurable pull.

:func:`average_base` is the other half of the same loss: for fixed warps, the base that
minimises the base-frame term is the masked mean of the patterns warped onto it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .affine import invert, rotation, warp

__all__ = [
    "refine_affine",
    "masked_error",
    "average_base",
    "radial_background",
    "disk_regions",
    "disk_centres",
    "rigid_disk_model",
]


def _gradients(base: torch.Tensor) -> torch.Tensor:
    """Central-difference gradients along qx (rows) and qy (columns): (B, 2, H, W)."""
    gx = torch.zeros_like(base)
    gy = torch.zeros_like(base)
    gx[..., 1:-1, :] = 0.5 * (base[..., 2:, :] - base[..., :-2, :])
    gy[..., :, 1:-1] = 0.5 * (base[..., :, 2:] - base[..., :, :-2])
    return torch.cat([gx, gy], 1)


def catmull_rom_upsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Images resampled onto a grid ``factor`` times finer by Catmull-Rom cubic convolution.

    Pixel centres keep their places: output pixel ``j`` lies at input coordinate
    ``(j + 0.5) / factor - 0.5`` (``align_corners=False``), and outside the image counts zero, as
    in ``grid_sample``. Catmull-Rom (Keys' kernel with ``a = -0.5``) reproduces quadratics;
    torch's bicubic (``a = -0.75``) does not, and rings more at a sharp disk's edge.

    Shapes: (B, C, H, W) in, (B, C, factor H, factor W) out; ``factor`` 1 returns the images.
    """

    def keys(d: torch.Tensor) -> torch.Tensor:
        d = d.abs()
        inner = (1.5 * d - 2.5) * d * d + 1
        outer = ((-0.5 * d + 2.5) * d - 4) * d + 2
        return torch.where(d <= 1, inner, torch.where(d < 2, outer, torch.zeros_like(d)))

    for dim in (2, 3):
        x = torch.arange(images.shape[dim] * factor, dtype=images.dtype, device=images.device)
        x = (x + 0.5) / factor - 0.5
        left = torch.floor(x)
        padded = F.pad(images.movedim(dim, -1), (2, 2)).movedim(-1, dim)
        shape = [-1 if i == dim else 1 for i in range(images.ndim)]
        images = sum(
            keys(x - left - k).reshape(shape) * padded.index_select(dim, (left + k + 2).long())
            for k in (-1, 0, 1, 2)
        )
    return images


def _grid(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Points ``v`` (B, P, 2) px (qx, qy) of an image of ``shape`` (H, W) as ``grid_sample``'s
    normalised grid (B, P, 1, 2). The same for a copy of the image on a finer grid (pixel
    centres aligned): ``align_corners=False`` scales with the image."""
    h, w = shape
    return torch.stack([(2 * v[..., 1] + 1) / w - 1, (2 * v[..., 0] + 1) / h - 1], -1)[:, :, None]


def _sample_grid(
    images: torch.Tensor, grid: torch.Tensor, *, mode: str = "bilinear"
) -> torch.Tensor:
    """``images`` (B, C, H, W) at the points of :func:`_grid` (B, P, 1, 2): (B, C, P), zero
    outside."""
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)[..., 0]


def _sample_at(images: torch.Tensor, v: torch.Tensor, *, mode: str = "bilinear") -> torch.Tensor:
    """``images`` (B, C, H, W) at the points ``v`` (B, P, 2) px (qx, qy): (B, C, P), zero
    outside."""
    return _sample_grid(images, _grid(v, images.shape[-2:]), mode=mode)


def disk_centres(
    base: torch.Tensor,
    labels: torch.Tensor,
    *,
    center: tuple[float, float],
    disk_radius: float,
    rounds: int = 3,
) -> torch.Tensor:
    """Centre of each labelled Bragg disk of bases (K, 1, H, W), about ``center``.

    Starting from the intensity-weighted centre of the disk's region (``labels`` from
    :func:`disk_regions`), each round takes the centre of mass, within ``disk_radius + 3`` px
    of the last centre, of the intensity above the median of the 2 px wide ring around that
    window: a level the disk sits on (diffuse scattering, an imperfect background split) does
    not pull the centre towards the brighter side, as it pulls a plain centre of mass.

    Returns
    -------
    Tensor of shape (K, L, 2)
        (qx, qy) px about ``center``, L = the largest label + 1; row 0 (no disk) is zero.
    """
    k, _, h, w = base.shape
    n = int(labels.max()) + 1
    rows, cols = np.indices((h, w), dtype=np.float64)
    images = base[:, 0].double().cpu().numpy()
    names = labels[:, 0].round().long().cpu().numpy()
    out = np.zeros((k, n, 2))
    window = disk_radius + 3.0
    for b in range(k):
        image = images[b]
        for label in range(1, n):
            region = names[b] == label
            if not region.any():
                continue
            weight = np.clip(image[region], 0, None)
            at = np.array([rows[region], cols[region]]) @ weight / max(weight.sum(), 1e-12)
            for _ in range(rounds):
                distance = np.hypot(rows - at[0], cols - at[1])
                inside = distance <= window
                ring = (distance > window) & (distance <= window + 2.0)
                level = np.median(image[ring]) if ring.any() else 0.0
                weight = np.clip(image[inside] - level, 0, None)
                if weight.sum() <= 0:
                    break
                at = np.array([rows[inside], cols[inside]]) @ weight / weight.sum()
            out[b, label] = at - np.asarray(center)
    return torch.from_numpy(out).to(base)


def radial_background(
    base: torch.Tensor, *, center: tuple[float, float], quantile: float = 0.05, smooth: float = 2.0
) -> torch.Tensor:
    """The smooth isotropic part of bases (K, 1, H, W), same shape.

    Per 1-px ring about ``center``, the ``quantile`` of the base's values (a low quantile
    passes between the disks a ring crosses: the first ring of a hexagonal lattice of large soft
    disks is 45 % disk, and at 0.2 the background kept their tails, which cost 0.3-0.8e-3 of
    isotropic strain on turned grains), smoothed along the radius by a Gaussian of
    ``smooth`` px so that no ring of disks leaves a bump that could stand in for a change of
    scale, and capped by the unsmoothed quantile so that the direct beam's edge does not spread.
    """
    k, _, h, w = base.shape
    rows = torch.arange(h, dtype=torch.float32, device=base.device)[:, None] - center[0]
    cols = torch.arange(w, dtype=torch.float32, device=base.device)[None, :] - center[1]
    ring = torch.round(torch.sqrt(rows**2 + cols**2)).long().reshape(-1)
    flat = base.reshape(k, -1).float()
    radii = int(ring.max()) + 1
    profile = torch.zeros(k, radii, device=base.device)
    for r in range(radii):
        sel = ring == r
        if sel.any():
            profile[:, r] = torch.quantile(flat[:, sel], quantile, dim=1)
    if smooth > 0:
        taps = torch.arange(
            -int(3 * smooth), int(3 * smooth) + 1, dtype=torch.float32, device=base.device
        )
        kernel = torch.exp(-0.5 * (taps / smooth) ** 2)
        padded = F.pad(profile[:, None], (len(taps) // 2, len(taps) // 2), mode="replicate")
        smoothed = F.conv1d(padded, (kernel / kernel.sum())[None, None])[:, 0]
        # Never above the ring's own quantile: smoothing must not spread the direct beam's edge
        # outwards, where the lattice part would keep it as a dark halo that moves with the warp.
        profile = torch.minimum(smoothed, profile)
    return profile[:, ring].reshape(base.shape).to(base.dtype)


def disk_regions(
    base: torch.Tensor,
    *,
    center: tuple[float, float],
    inner: float,
    disk_radius: float,
    most: int = 63,
) -> torch.Tensor:
    """One label per Bragg disk of each base (K, 1, H, W) -> labels of the same shape.

    Disks are the local maxima of the base averaged over a disk-sized box (one maximum per
    disk, flat-topped or not) beyond ``inner`` px, brighter than its median plus a tenth of its
    spread; each pixel takes the label (1, 2, ...) of its nearest disk, and 0 (the shared
    region) beyond half the smallest disk spacing. At most ``most`` disks, the brightest.
    """
    out = torch.zeros_like(base)
    rows = torch.arange(base.shape[-2], dtype=torch.float32, device=base.device)
    cols = torch.arange(base.shape[-1], dtype=torch.float32, device=base.device)
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    radius = torch.hypot(rr - center[0], cc - center[1])
    for i, image in enumerate(base[:, 0].float()):
        size = max(1, int(round(disk_radius)))
        smooth = F.avg_pool2d(
            image[None, None], 2 * size + 1, stride=1, padding=size, count_include_pad=False
        )[0, 0]
        window = F.max_pool2d(smooth[None, None], 2 * size + 1, stride=1, padding=size)[0, 0]
        peak = (smooth == window) & (radius > inner)
        level = smooth.median() + 0.1 * (smooth.quantile(0.99) - smooth.median())
        peak &= smooth > level
        if peak.sum() < 2:
            continue
        where = peak.nonzero().float()
        keep = smooth[peak].argsort(descending=True)[:most]
        where = where[keep]
        dist = torch.cdist(torch.stack([rr, cc], -1).reshape(-1, 2), where)  # (HW, n)
        nearest = dist.min(1)
        spacing = torch.cdist(where, where).fill_diagonal_(float("inf")).min()
        label = torch.where(
            nearest.values <= spacing / 2, nearest.indices + 1, torch.zeros_like(nearest.indices)
        )
        out[i, 0] = label.reshape(image.shape).to(out.dtype)
    return out


def rigid_disk_model(
    lattice: torch.Tensor, *, center: tuple[float, float], inner: float, disk_radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``disks`` argument of :func:`refine_affine` and :func:`solve_bases` for bases
    (K, 1, H, W) (their lattice part): the labels of :func:`disk_regions` beyond ``inner`` px,
    (K, 1, H, W), and the centres of :func:`disk_centres`, (K, L, 2). One function, so that
    the starting bases are solved with the disks the inference moves."""
    labels = disk_regions(lattice, center=center, inner=inner, disk_radius=disk_radius)
    return labels, disk_centres(lattice, labels, center=center, disk_radius=disk_radius)


def _reachable(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The pixels (H, W) bool that the ring ``mask`` (H, W) can reach when it moves with a warp:
    the ring widened by the largest scale (6 %) and shift (``t`` (B, 2) px) plus a margin."""
    h, w = mask.shape
    reach = int(6 + float(t.abs().max()) + 0.06 * max(h, w) / 2)
    return F.max_pool2d(mask[None, None], 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0


def _base_points(
    u: torch.Tensor,
    W: torch.Tensor,
    shift: torch.Tensor,
    *,
    center: tuple[float, float],
    disks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base-frame point ``v`` (B, P, 2) px of each pattern pixel ``u`` (P, 2) (px about
    ``center``), the lever ``l`` (B, P, 2) and the turn ``T`` (B, 2, 2) with
    ``d mu / d W_ij = (T grad B)_i l_j`` and ``d mu / d shift = T grad B`` (both negated for
    rigid disks).

    Affine (``disks`` None; ``W``, ``shift`` the inverse warp ``M``, ``d``): ``v = c + M u + d``,
    lever ``u``, ``T = I``. Rigid disks (``W``, ``shift`` the warp ``A``, ``t``; ``disks`` the
    labels (B, 1, H, W) and centres (B, L, 2) of the base's disks): a pixel of disk ``n``
    (centre ``b_n`` in the base) is that disk's pixel placed at the disk's new centre
    ``A b_n + t``, turned by the rotation ``R`` of ``A`` but not stretched,
    ``v = c + b_n + R^T (u - A b_n - t)``, ``T = R`` (held fixed in each step); a pixel between
    disks keeps the affine point (``b`` = its own base point). Turning the disk with the lattice
    makes an error in ``b_n`` cost only ``(A - R) db``, not ``(A - I) db``.
    """
    b = W.shape[0]
    c = u.new_tensor(center)
    eye = torch.eye(2, dtype=u.dtype, device=u.device)
    if disks is None:
        return _affine(W, u, c + shift), u.expand(b, -1, -1), eye.expand(b, 2, 2)
    labels, centres = disks[0].float(), disks[1].to(u)
    M, d = invert(W, shift)
    affine = _affine(M, u, d)  # (B, P, 2), about the centre
    disk = _sample_at(labels, c + affine, mode="nearest")[:, 0].round().long()
    disk = disk.clamp(0, centres.shape[1] - 1)[..., None].expand(-1, -1, 2)
    lever = torch.where(disk > 0, centres.gather(1, disk), affine)
    R = rotation(torch.atan2(W[:, 1, 0] - W[:, 0, 1], W[:, 0, 0] + W[:, 1, 1]))
    # c + lever + R^T (u - A lever - t) = c - R^T t + R^T u + (I - R^T A) lever
    Q = R.transpose(1, 2)
    fixed = _affine(Q, u, c - (Q @ shift[..., None])[..., 0])
    return fixed + _affine(eye - Q @ W, lever), lever, R


def _affine(M: torch.Tensor, p: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """``M p + t`` for matrices ``M`` (B, 2, 2), points ``p`` (B, P, 2) or (P, 2) and shifts
    ``t`` (B, 2) (none: zero): (B, P, 2). Written out per component: batched products with an
    inner size of 2, or broadcasts over the last axis, are several times slower on CPU."""
    p0, p1 = p[..., 0], p[..., 1]
    out = [M[:, i, :1] * p0 + M[:, i, 1:] * p1 for i in (0, 1)]
    if t is not None:
        out = [o + t[:, i : i + 1] for i, o in enumerate(out)]
    return torch.stack(out, -1)


def _sample_bases(images: torch.Tensor, which: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Pattern ``i``'s points (:func:`_grid` (B, P, 1, 2), base frame) read from
    ``images[which[i]]`` ((K, C, fH, fW), the bases or a finer copy): (B, C, P)."""
    c, (b, p) = images.shape[1], grid.shape[:2]
    if len(images) == 1:  # one base for all: one read, no copy
        return _sample_grid(images, grid.reshape(1, -1, 1, 2)).reshape(c, b, p).transpose(0, 1)
    out = grid.new_empty(b, c, p)
    for j in which.unique().tolist():
        mine = which == j
        at = grid[mine].reshape(1, -1, 1, 2)
        out[mine] = _sample_grid(images[j : j + 1], at).reshape(c, -1, p).transpose(0, 1)
    return out


def masked_error(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor,
    *,
    center: tuple[float, float] | torch.Tensor,
) -> torch.Tensor:
    """Mean squared difference between ``x`` and its base warped onto it, inside the moving mask.

    Shapes: ``x``, ``base`` (B, 1, H, W); ``A`` (B, 2, 2); ``t`` (B, 2); ``mask`` (H, W);
    ``center`` (qx, qy) px, two floats or a tensor of shape (2,). Returns (B,).
    """
    stack = torch.cat([base, mask.to(base).expand(base.shape[0], 1, -1, -1)], 1)
    sampled = warp(stack, *invert(A, t), center=center)
    w = sampled[:, 1]
    return (w * (sampled[:, 0] - x[:, 0]) ** 2).sum((1, 2)) / w.sum((1, 2)).clamp_min(1.0)


def refine_affine(
    x: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    mask: torch.Tensor,
    *,
    center: tuple[float, float],
    steps: int,
    damping: float = 1e-3,
    max_step_px: float = 3.0,
    poisson: bool = False,
    background: torch.Tensor | None = None,
    regions: torch.Tensor | None = None,
    disks: tuple[torch.Tensor, torch.Tensor] | None = None,
    upsample: int = 2,
) -> dict[str, torch.Tensor]:
    """Refine the warps ``A``, ``t`` of patterns ``x`` against their bases.

    Parameters
    ----------
    x
        Tensor of shape (B, 1, H, W): preprocessed patterns.
    base
        Tensor of shape (B, 1, H, W): each pattern's base.
    A, t
        Tensors of shape (B, 2, 2) and (B, 2): the starting warp base -> pattern (px, (qx, qy)).
    mask
        Float tensor of shape (H, W): the ring in the base frame.
    center
        (qx, qy) px.
    steps
        Gauss-Newton iterations.
    damping
        Levenberg-Marquardt damping, relative to the diagonal of the normal matrix.
    max_step_px
        Largest displacement one step may give a pixel of the ring.
    poisson
        Fit by Poisson maximum likelihood (iteratively reweighted, weights ``1 / mu`` with
        ``mu`` the model intensity, floored at a tenth of its mean; the objective is the mean
        Poisson deviance) instead of least squares: for linear-intensity count data at low dose.
    background
        Tensor of shape (B or 1, 1, H, W): an isotropic background that does not move with the
        lattice (e.g. diffuse scattering about the direct beam); fitted with its own amplitude
        ``h`` and not warped. ``base`` is then the lattice part only.
    regions
        Tensor of shape (B, 1, H, W): labels of the base's pixels (0, 1, ...), one gain each.
    disks
        Tensors of shape (B, 1, H, W) and (B, L, 2): labels of the base's Bragg disks
        (:func:`disk_regions`) and their centres (:func:`disk_centres`). Given, each disk moves
        rigidly with the lattice, by ``A`` applied
        to its centre, instead of being stretched by ``A`` with the whole pattern: a disk's size
        and shape are set by the probe's convergence angle, not by the crystal, and stretching
        them pulls the fitted strain towards zero (by 5-10 % on soft, steeply fading disks).
    upsample
        The base is resampled onto a grid this many times finer (:func:`catmull_rom_upsample`)
        and sampled bilinearly there; 1 samples the base itself bilinearly. Bilinear sampling is
        only piecewise smooth: the objective has a kink wherever a point crosses a pixel line,
        and the fit stops in the valleys between them. With the same trained models, 2 lowered
        CC-ST-AE's error (exx/eyy/exy, 1e-3) on multislice Si from 0.60/0.68/0.25 to
        0.43/0.52/0.33 (clean) and from 3.30/3.36/2.48 to 2.91/2.81/2.27 (1,000 electrons per
        pattern), and on multislice WS2 from 1.46/1.13/1.06 to 1.24/0.85/0.83. A finer grid (4)
        did as well on these but worse on the simulator's ideal disks (eyy 0.27 against 0.24
        at 20 % noise; 1.62 against 1.53 on the hardest settings at 70 %), where 2 keeps
        0.25 and 1.58.

    Returns
    -------
    dict
        ``matrix`` (B, 2, 2) and ``shift`` (B, 2): the refined warp; ``gain``, ``offset`` (B,);
        ``error`` (B,): the masked mean squared residual; ``start_error`` (B,): the same for the
        starting warp with unit gain and zero offset; ``objective`` (B,): the minimised
        objective (the mean squared residual, or the Poisson deviance), to compare two fits of the
        same patterns; ``level`` (B,), the background's amplitude, when a background is given.

    Examples
    --------
    >>> from stemlib.masks import ring_mask
    >>> from stemlib.ccstae.affine import affine_matrix
    >>> r = torch.arange(64.0) - 32
    >>> u = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1)  # (qx, qy) about the centre
    >>> blobs = [(1.0, [0.0, 16.0]), (1.0, [-16.0, 0.0]), (0.5, [0.0, -20.0])]
    >>> def seen_through(M):  # the blobs, drawn where the warp M puts them
    ...     v = u @ torch.linalg.inv(M).T
    ...     dist2 = [((v - torch.tensor(p)) ** 2).sum(-1) for _, p in blobs]
    ...     return sum(a * torch.exp(-d / 8) for (a, _), d in zip(blobs, dist2))[None, None]
    >>> A = affine_matrix(*torch.tensor([[1.02], [0.99], [0.01], [0.05]]))
    >>> base, x = seen_through(torch.eye(2)), seen_through(A[0])
    >>> mask = torch.from_numpy(ring_mask((64, 64), inner=8, outer=28)).float()
    >>> start = (torch.eye(2)[None], torch.zeros(1, 2))
    >>> fit = refine_affine(x, base, *start, mask, center=(32.0, 32.0), steps=15)
    >>> bool((fit["matrix"] - A).abs().max() < 5e-4)
    True
    """
    x, base, A, t = x.float(), base.float(), A.float(), t.float()
    b, _, h, w = x.shape
    mask = mask.to(x)
    near = _reachable(mask, t)
    u = near.nonzero().to(x.dtype) - x.new_tensor(center)  # (P, 2) px about the centre
    # Each distinct base (a batch holds a few, repeated) on a grid `upsample` times finer, no
    # value beyond its own range (a cubic rings past a sharp disk's edge), and its gradients
    # per pixel of the pattern.
    distinct, which = torch.unique(base.flatten(1), dim=0, return_inverse=True)
    distinct = distinct.reshape(-1, 1, h, w)
    fine = catmull_rom_upsample(distinct, upsample)
    fine = torch.minimum(
        torch.maximum(fine, distinct.amin((1, 2, 3), keepdim=True)),
        distinct.amax((1, 2, 3), keepdim=True),
    )
    image = torch.cat([fine, _gradients(fine) * upsample], 1)  # (K, 3, fH, fW)
    ring = mask.expand(b, 1, -1, -1)

    labels = (regions if regions is not None else torch.zeros_like(base)).float()
    k = int(labels.max()) + 1
    rigid = disks is not None
    target = x[:, 0][:, near]  # (B, P)
    radius = float(u.norm(dim=1).max())
    bg = None if background is None else background.float()[:, 0][:, near].expand(b, -1)  # (B, P)
    # The warp fitted: the inverse (M, d) for the affine model, (A, t) itself for rigid disks.
    W, shift = (A, t) if rigid else invert(A, t)
    # Intensity model: mu(u) = gain[L(v)] B(v) + offset + level bg(u), with L the region of
    # the base pixel v; linear in (offset, level) ("dense") and in the K gains.
    dense = torch.zeros(b, 2 if bg is not None else 1, dtype=x.dtype, device=x.device)
    gains = torch.ones(b, k, dtype=x.dtype, device=x.device)
    nd = 6 + dense.shape[1]

    def residuals(W: torch.Tensor, shift: torch.Tensor, dense: torch.Tensor, gains: torch.Tensor):
        v, lever, turn = _base_points(u, W, shift, center=center, disks=disks)
        grid = _grid(v, (h, w))
        s = _sample_bases(image, which, grid)  # (B, 3, P): B, dB/dqx, dB/dqy
        if k == 1:
            region, pixel_gain = None, gains
        else:
            region = _sample_grid(labels, grid, mode="nearest")[:, 0].round().long()
            region = region.clamp(0, k - 1)
            pixel_gain = gains.gather(1, region)
        model = pixel_gain * s[:, 0] + dense[:, :1]
        if bg is not None:
            model = model + dense[:, 1:2] * bg
        return s, lever, turn, region, pixel_gain, model - target, _sample_grid(ring, grid)[:, 0]

    def mse(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (weight * r**2).sum(1) / weight.sum(1).clamp_min(1.0)

    def fit_weights(r: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the next step and the objective that a step must lower."""
        if not poisson:
            return weight, mse(r, weight)
        mu = r + target
        floor = 0.1 * (
            (weight * mu).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1.0)
        ).clamp_min(1e-12)
        mu = torch.maximum(mu, floor)
        # The deviance, not the negative log-likelihood: both have the same steps, but only the
        # deviance is zero wherever the model fits. The moving ring changes which pixels are
        # weighted, and the likelihood of a bright pixel is far below a dark one's, so the
        # mean likelihood rewarded a warp that pulled bright disk pixels into the ring.
        seen = target.clamp_min(0.0)
        deviance = mu - seen + torch.xlogy(seen, seen) - seen * torch.log(mu)
        return weight / mu, (weight * deviance).sum(1) / weight.sum(1).clamp_min(1.0)

    def weighted_rows(
        s: torch.Tensor,
        lever: torch.Tensor,
        turn: torch.Tensor,
        region: torch.Tensor | None,
        pixel_gain: torch.Tensor,
        r: torch.Tensor,
        root_w: torch.Tensor,
    ) -> torch.Tensor:
        """d mu / d (W, shift, offset, level, gains) and the residual, each pixel's entry times
        the root of its weight: (B, nd + K + 1, P). Their Gram matrix (one batched product)
        holds the normal matrix and, in its last column, the gradient."""
        J = root_w.new_empty(b, nd + k + 1, root_w.shape[1])
        # T grad B, weighted: the shift's rows; the warp's are these times the lever.
        g = sign * pixel_gain * root_w
        gx = torch.mul(g, turn[:, 0, :1] * s[:, 1] + turn[:, 0, 1:] * s[:, 2], out=J[:, 4])
        gy = torch.mul(g, turn[:, 1, :1] * s[:, 1] + turn[:, 1, 1:] * s[:, 2], out=J[:, 5])
        for row, (grad, i) in enumerate(((gx, 0), (gx, 1), (gy, 0), (gy, 1))):
            torch.mul(grad, lever[..., i], out=J[:, row])
        J[:, 6] = root_w
        if bg is not None:
            torch.mul(bg, root_w, out=J[:, 7])
        e = s[:, 0] * root_w  # d mu / d gain of the pixel's region
        if region is None:
            J[:, nd] = e
        else:
            for j in range(k):
                torch.mul(e, region == j, out=J[:, nd + j])
        torch.mul(r, root_w, out=J[:, -1])
        return J

    sign = -1.0 if rigid else 1.0
    with torch.no_grad():
        s, lever, turn, region, pixel_gain, r, weight = residuals(W, shift, dense, gains)
        start_error = mse(r, weight)
        w_fit, best = fit_weights(r, weight)
        best_W, best_shift, best_dense, best_gains, best_error = W, shift, dense, gains, start_error
        for _ in range(steps):
            rows = weighted_rows(s, lever, turn, region, pixel_gain, r, w_fit.sqrt())
            gram = rows @ rows.transpose(1, 2)
            H, rhs = gram[:, :-1, :-1], -gram[:, :-1, -1]
            diag = torch.diagonal(H, dim1=1, dim2=2)
            H = H + torch.diag_embed(damping * diag + 1e-6 * diag.mean(1, keepdim=True) + 1e-12)
            step = torch.linalg.solve(H, rhs)
            dW = step[:, :4].reshape(b, 2, 2)
            move = dW.flatten(1).abs().sum(1) * radius + step[:, 4:6].abs().sum(1)
            scale = torch.clamp(max_step_px / move.clamp_min(1e-12), max=1.0)
            W = W + scale[:, None, None] * dW
            shift = shift + scale[:, None] * step[:, 4:6]
            dense = dense + scale[:, None] * step[:, 6:nd]
            gains = gains + scale[:, None] * step[:, nd:]
            s, lever, turn, region, pixel_gain, r, weight = residuals(W, shift, dense, gains)
            w_fit, objective = fit_weights(r, weight)
            better = objective < best
            best = torch.where(better, objective, best)
            best_error = torch.where(better, mse(r, weight), best_error)
            best_W = torch.where(better[:, None, None], W, best_W)
            best_shift = torch.where(better[:, None], shift, best_shift)
            best_dense = torch.where(better[:, None], dense, best_dense)
            best_gains = torch.where(better[:, None], gains, best_gains)
    A_out, t_out = (best_W, best_shift) if rigid else invert(best_W, best_shift)
    out = {
        "matrix": A_out,
        "shift": t_out,
        "gain": best_gains[:, 0] if k == 1 else best_gains.median(1).values,
        "offset": best_dense[:, 0],
        "error": best_error,
        "start_error": start_error,
        "objective": best,
    }
    if k > 1:
        out["region_gains"] = best_gains
    if bg is not None:
        out["level"] = best_dense[:, 1]
    return out


def average_base(
    x: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    gain: torch.Tensor,
    offset: torch.Tensor,
    *,
    center: tuple[float, float],
    unwarped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sums whose ratio is the least-squares base for fixed warps and intensities.

    For patterns modelled as ``x_i = g_i B + o_i`` in the base frame, the base minimising the
    squared difference is ``B = sum g_i (x_i - o_i) / sum g_i^2``, both sums taken over the
    patterns warped onto the base frame (pixels a pattern does not cover count zero).

    Shapes: ``x`` (B, 1, H, W); ``A`` (B, 2, 2); ``t`` (B, 2); ``gain``, ``offset`` (B,);
    ``unwarped`` (B, 1, H, W), a fitted part of each pattern that does not move with the lattice
    (the background times its level), subtracted first. Returns the numerator and the denominator,
    each (1, 1, H, W), to accumulate over batches.
    """
    g = gain[:, None, None, None]
    rest = x - offset[:, None, None, None] - (0 if unwarped is None else unwarped)
    warped = warp(torch.cat([rest, torch.ones_like(x)], 1), A, t, center=center)
    return (g * warped[:, :1]).sum(0, keepdim=True), (g**2 * warped[:, 1:]).sum(0, keepdim=True)


def solve_bases(
    x: torch.Tensor,
    bases: torch.Tensor,
    labels: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    intensity: dict[str, torch.Tensor],
    mask: torch.Tensor,
    *,
    center: tuple[float, float],
    background: torch.Tensor | None = None,
    disks: tuple[torch.Tensor, torch.Tensor] | None = None,
    upsample: int = 2,
    iterations: int = 8,
    batch_size: int = 256,
) -> torch.Tensor:
    """The bases that best predict the patterns through their warps (least squares, by conjugate
    gradients from ``bases``).

    Minimises ``sum_i sum_u m'_i (mu_i(u) - x_i(u))^2`` over the bases, with ``mu_i`` the model of
    :func:`refine_affine` (the base warped onto pattern ``i``, its gain, offset and background
    level held fixed), read from the base as the refinement reads it (``upsample``, ``disks``:
    the bases' disks, each moved rigidly). Unlike the average of the patterns warped onto the
    base, this does not blur the bases by the interpolation of the data, which matters for small
    sharp disks; and a base solved through another model than the refinement's is fitted to that
    model's errors.

    Shapes: ``x`` (n, 1, H, W); ``bases`` (K, 1, H, W) (the lattice part when ``background``
    (K, 1, H, W) is given); ``labels`` (n,); ``A`` (n, 2, 2); ``t`` (n, 2); ``intensity``: the
    (n,) tensors ``gain``, ``offset`` and, with a background, ``level``; ``mask``
    (H, W); ``disks``: labels (K, 1, H, W) and centres (K, L, 2) (:func:`disk_regions`,
    :func:`disk_centres`). Returns (K, 1, H, W).
    """
    n = x.shape[0]
    ring = mask.to(x)[None, None]
    near = _reachable(ring[0, 0], t)  # the rest has no weight
    u = near.nonzero().to(x.dtype) - x.new_tensor(center)  # (P, 2) px about the centre
    W, shift = (A, t) if disks is not None else invert(A, t)

    def gradient(B: torch.Tensor) -> torch.Tensor:
        B = B.detach().requires_grad_(True)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            k = labels[sl]
            mine = None if disks is None else (disks[0][k], disks[1][k])
            v, _, _ = _base_points(u, W[sl], shift[sl], center=center, disks=mine)
            grid = _grid(v, x.shape[-2:])
            sampled = _sample_bases(catmull_rom_upsample(B, upsample), k, grid)
            weight = _sample_grid(ring.expand(len(k), -1, -1, -1), grid)[:, 0]
            model = intensity["gain"][sl, None] * sampled[:, 0] + intensity["offset"][sl, None]
            if background is not None:
                model = model + intensity["level"][sl, None] * background[k][:, 0][:, near]
            loss = (weight * (model - x[sl, 0][:, near]) ** 2).sum()
            loss.backward()
        return B.grad.detach()

    B = bases.detach().clone()
    g = gradient(B)
    direction = -g
    for _ in range(iterations):
        Hd = gradient(B + direction) - g
        curvature = (direction * Hd).sum()
        if not curvature > 0:
            break
        alpha = (g * g).sum() / curvature
        B = B + alpha * direction
        g_new = g + alpha * Hd
        beta = (g_new * g_new).sum() / (g * g).sum().clamp_min(1e-30)
        direction = -g_new + beta * direction
        g = g_new
    return B
