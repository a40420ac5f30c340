"""Affine warps of diffraction patterns in the detector frame, and the one conversion to PyTorch.

Frame (CONVENTIONS.md section 1): a pattern is an image of shape (H, W) with ``qx`` = rows
(axis -2) and ``qy`` = columns (axis -1); pixel ``(i, j)`` sits at ``u = (i, j)`` px. Every warp
here is about a centre ``c`` (the direct beam, ``(H // 2, W // 2)`` unless calibrated):

    warp(image, A, t)(u) = image(c + A (u - c) + t)

with ``A`` a 2x2 matrix and ``t`` a shift in px, both in the (qx, qy) frame.

Geometry of CC-ST-AE
--------------------
The network warps each pattern onto its base: ``warp(pattern, A, t) = base``, i.e. the pattern at
``c + A v + t`` holds what the base holds at ``c + v``. A Bragg disk of the base at reciprocal
vector ``g_base`` (px from the beam) therefore sits at ``A g_base`` in the pattern (the shift
``t`` moves the whole pattern, as descan does, and carries no strain). With CONVENTIONS.md's
``g' = F^-T g`` this gives, relative to the base,

    F_base^-T = A,   F_base = A^-T,

and against a reference whose matrix is ``A_ref``: ``F = (A A_ref^-1)^-T`` (see
:mod:`stemlib.ccstae.strain`). PyTorch's :func:`torch.nn.functional.affine_grid` works in
``(x, y) = (column, row)`` normalised to ``[-1, 1]``; :func:`torch_theta` is the only place that
converts, and ``tests/test_ccstae_affine.py`` fails on any swap or sign error in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "affine_matrix",
    "rotation",
    "invert",
    "torch_theta",
    "warp",
    "sampling_grid",
]


def rotation(theta: torch.Tensor) -> torch.Tensor:
    """Rotation matrices by ``theta`` (rad, shape (B,)) from ``+qx`` towards ``+qy``: (B, 2, 2)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def affine_matrix(
    scale_x: torch.Tensor, scale_y: torch.Tensor, shear: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """``A = R(theta) S`` with the symmetric stretch ``S = [[scale_x, shear], [shear, scale_y]]``.

    Parameters
    ----------
    scale_x, scale_y, shear, theta
        Tensors of shape (B,): stretch along ``qx`` and ``qy``, symmetric shear (unitless) and
        rotation (rad, from +qx towards +qy), all acting on the base's coordinates.

    Returns
    -------
    Tensor of shape (B, 2, 2)
        ``A`` in the (qx, qy) frame. With ``F = A^-T`` (module docstring), ``F = R S^-1``: the
        pattern's lattice is the base's stretched by ``S^-1`` and turned by ``theta``.
    """
    s = torch.stack([torch.stack([scale_x, shear], -1), torch.stack([shear, scale_y], -1)], -2)
    return rotation(theta) @ s


def invert(A: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse warp: ``warp(warp(x, A, t), *invert(A, t)) == x`` (up to interpolation).

    Parameters
    ----------
    A
        Tensor of shape (B, 2, 2).
    t
        Tensor of shape (B, 2), px.

    Returns
    -------
    (Tensor of shape (B, 2, 2), Tensor of shape (B, 2))
        ``A^-1`` and ``-A^-1 t``.
    """
    inverse = torch.linalg.inv(A)
    return inverse, -(inverse @ t.unsqueeze(-1)).squeeze(-1)


def torch_theta(
    A: torch.Tensor,
    t: torch.Tensor,
    *,
    shape: tuple[int, int],
    center: tuple[float, float] | torch.Tensor,
) -> torch.Tensor:
    """PyTorch's ``affine_grid`` theta for the warp ``u -> c + A (u - c) + t`` in the (qx, qy)
    frame.

    Parameters
    ----------
    A
        Tensor of shape (B, 2, 2), (qx, qy) frame.
    t
        Tensor of shape (B, 2), shift (qx, qy) in px.
    shape
        (H, W) of the images.
    center
        (qx, qy) of the warp's centre in px: two floats, or a tensor of shape (2,) on any device
        (the model's centre buffer, so that ``torch.compile`` takes it as an input instead of
        baking it into the graph as a constant). Either way ``c - o`` is formed in float64 and
        then rounded to ``A``'s dtype, so both give the same numbers.

    Returns
    -------
    Tensor of shape (B, 2, 3)
        For ``affine_grid(theta, size, align_corners=False)``, whose coordinates are
        ``n = (x, y)`` with ``x = (2 j + 1) / W - 1`` for column ``j`` and ``y`` likewise for rows.

    Notes
    -----
    With ``P`` the swap (qx, qy) -> (x, y), pixel ``(column, row) = D n + o`` for
    ``D = diag(W / 2, H / 2)`` and ``o = ((W - 1) / 2, (H - 1) / 2)``. Writing ``A' = P A P``,
    ``c' = P c`` and ``t' = P t``, the warp in ``n`` is

        n_in = D^-1 A' D n_out + D^-1 ((I - A') (c' - o) + t').
    """
    h, w = shape
    swap = A.new_tensor([[0.0, 1.0], [1.0, 0.0]])
    a_xy = swap @ A @ swap
    t_xy = t.flip(-1)
    d = A.new_tensor([w / 2.0, h / 2.0])
    c = torch.as_tensor(center, dtype=torch.float64, device=A.device)
    c_minus_o = (c.flip(-1) - c.new_tensor([(w - 1) / 2.0, (h - 1) / 2.0])).to(A.dtype)
    eye = torch.eye(2, dtype=A.dtype, device=A.device)
    linear = a_xy * d.unsqueeze(0) / d.unsqueeze(1)  # D^-1 A' D
    shift = (((eye - a_xy) @ c_minus_o) + t_xy) / d
    return torch.cat([linear, shift.unsqueeze(-1)], -1)


def warp(
    images: torch.Tensor,
    A: torch.Tensor,
    t: torch.Tensor,
    *,
    center: tuple[float, float] | torch.Tensor,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample ``images`` at ``c + A (u - c) + t`` for every pixel ``u``; zero outside.

    Parameters
    ----------
    images
        Tensor of shape (B, C, H, W) (``qx`` = rows).
    A
        Tensor of shape (B, 2, 2).
    t
        Tensor of shape (B, 2), px.
    center
        (qx, qy) of the centre in px: two floats or a tensor of shape (2,) (see
        :func:`torch_theta`).
    mode
        ``"bilinear"`` or ``"bicubic"`` interpolation.

    Returns
    -------
    Tensor of shape (B, C, H, W)

    Examples
    --------
    >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 6] = 1.0  # a spot at +2 px along qy
    >>> quarter = rotation(torch.tensor([torch.pi / 2]))  # sample at R(90 deg) u
    >>> y = warp(x, quarter, torch.zeros(1, 2), center=(4.0, 4.0))
    >>> [int(v) for v in (y[0, 0] > 0.5).nonzero()[0]]  # R u = (0, 2) at u = (2, 0)
    [6, 4]
    """
    h, w = images.shape[-2:]
    theta = torch_theta(A.to(images.dtype), t.to(images.dtype), shape=(h, w), center=center)
    return F.grid_sample(
        images, sampling_grid(theta, h, w), mode=mode, padding_mode="zeros", align_corners=False
    )


def sampling_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)``, the same numbers, built by
    one batched matrix product of the pixels' normalised coordinates.

    ``affine_grid``'s backward fails under ``torch.compile`` once the batch size varies
    (Dynamo then makes it symbolic: "SymIntArrayRef expected to contain only concrete
    integers"), and training meets batches of several sizes (each data worker's last one).

    Parameters
    ----------
    theta
        Tensor of shape (B, 2, 3), :func:`torch_theta`.
    h, w
        The images' rows and columns.

    Returns
    -------
    Tensor of shape (B, h, w, 2): each pixel's (x, y) sampling position in [-1, 1].
    """

    def steps(n: int) -> torch.Tensor:  # pixel centres; as ATen forms them, to the last bit
        if n <= 1:
            return theta.new_zeros(n)
        return torch.linspace(-1.0, 1.0, n, dtype=theta.dtype, device=theta.device) * (n - 1) / n

    xs, ys = steps(w).expand(h, w), steps(h)[:, None].expand(h, w)
    pixels = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    return pixels.expand(theta.shape[0], -1, -1).bmm(theta.transpose(1, 2)).view(-1, h, w, 2)
