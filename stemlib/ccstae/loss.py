"""The CC-ST-AE training loss: masked cycle MSE both ways, base L1, affine hinges, robust batching.

With ``m`` the ring mask in the base frame (:class:`stemlib.masks.MaskSchedule`) and ``m'`` the
same mask warped onto each input by the inverse transform (it moves with the transform):

    l_i = [ <m (T(x_i) - b_i)^2> / <m>  +  <m' (T^-1(b_i) - x_i)^2> / <m'> ] / 2

per pattern ``i``; the batch loss is a robust mean of ``l_i`` (losses above ``outlier_factor``
x the batch median are log-compressed, so a few broken patterns cannot dominate a step), plus
``l1_base * mean|b|`` and the hinges ``scale_penalty * mean(relu(|s - 1| - scale_hinge))`` and
``shear_penalty * mean(relu(|shear| - shear_hinge))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .affine import invert, warp
from .config import CCSTAEConfig
from .model import CCSTAEOutput

__all__ = ["LossParts", "cycle_loss", "outlier_threshold", "robust_mean"]


@dataclass
class LossParts:
    """The loss (scalar tensor ``total``) and its parts, for logging.

    ``per_pattern`` is a tensor of shape (B,): the cycle MSE of each pattern.
    """

    total: torch.Tensor
    per_pattern: torch.Tensor
    base_frame: torch.Tensor
    input_frame: torch.Tensor
    l1: torch.Tensor
    hinge: torch.Tensor


def outlier_threshold(losses: torch.Tensor, factor: float) -> torch.Tensor:
    """``factor`` x the median of ``losses`` (B,), the level above which :func:`robust_mean`
    compresses a loss (no gradient flows through it)."""
    return factor * losses.detach().median().clamp_min(1e-12)


def robust_mean(
    losses: torch.Tensor,
    factor: float,
    *,
    tau: torch.Tensor | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """Mean of ``losses`` (B,) with values above ``factor`` x their median log-compressed.

    For a slice of a batch: ``tau`` is the whole batch's threshold (:func:`outlier_threshold`)
    and ``count`` its size, so that the slices' results sum to the batch's.

    Examples
    --------
    >>> losses = torch.tensor([1.0, 1.0, 1.0, 1000.0])
    >>> round(float(robust_mean(losses, 5.0)), 3)
    8.623
    >>> tau = 5.0 * losses.median()
    >>> halves = [robust_mean(part, 5.0, tau=tau, count=4) for part in losses.split(2)]
    >>> round(float(sum(halves)), 3)
    8.623
    """
    if tau is None:
        tau = outlier_threshold(losses, factor)
    compressed = torch.where(
        losses > tau, tau * (1 + torch.log(losses.clamp_min(1e-30) / tau)), losses
    )
    return compressed.mean() if count is None else compressed.sum() / count


def cycle_loss(
    out: CCSTAEOutput,
    x: torch.Tensor,
    mask: torch.Tensor,
    config: CCSTAEConfig,
    *,
    center: tuple[float, float] | torch.Tensor,
    batch: int | None = None,
    tau: torch.Tensor | None = None,
) -> LossParts:
    """The training loss of one batch, or of a slice of one.

    Parameters
    ----------
    out
        The model's output for ``x``.
    x
        Tensor of shape (B, 1, H, W), the preprocessed input.
    mask
        Float tensor of shape (H, W), the ring in the base frame (1 inside).
    config
        Weights and limits.
    center
        (qx, qy) px, the warps' centre (the model's ``center``): two floats or a tensor of
        shape (2,).
    batch, tau
        For ``x`` a slice of a batch: the batch's size and its :func:`robust_mean` threshold
        (``outlier_factor`` x the median of its ``per_pattern``). The slices' totals then sum to
        the batch's (so do their gradients). None: ``x`` is the batch.

    Returns
    -------
    LossParts
    """
    b = x.shape[0]
    m = mask.to(x.dtype)[None, None].expand(b, 1, -1, -1)
    A, t = out.affine.matrix(), out.affine.shift
    m_in = warp(m, *invert(A, t), center=center, mode="bilinear")
    base_frame = (m * (out.transformed_input - out.base) ** 2).sum((1, 2, 3)) / m.sum(
        (1, 2, 3)
    ).clamp_min(1.0)
    input_frame = (m_in * (out.transformed_base - x) ** 2).sum((1, 2, 3)) / m_in.sum(
        (1, 2, 3)
    ).clamp_min(1.0)
    per_pattern = 0.5 * (base_frame + input_frame)
    a = out.affine
    share = 1.0 if batch is None else b / batch
    hinge = share * (
        config.scale_penalty
        * (
            torch.relu((a.scale_x - 1).abs() - config.scale_hinge)
            + torch.relu((a.scale_y - 1).abs() - config.scale_hinge)
        ).mean()
        + config.shear_penalty * torch.relu(a.shear.abs() - config.shear_hinge).mean()
    )
    l1 = share * config.l1_base * out.bases.abs().mean()
    total = robust_mean(per_pattern, config.outlier_factor, tau=tau, count=batch) + l1 + hinge
    return LossParts(
        total,
        per_pattern.detach(),
        base_frame.detach().mean(),
        input_frame.detach().mean(),
        l1.detach(),
        hinge.detach(),
    )
