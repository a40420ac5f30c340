"""The rotation stage: each pattern's in-plane rotation over the full circle, before the network.

The ring of each pattern is resampled in polar coordinates ``(r, phi)`` (``phi`` from ``+qx``
towards ``+qy``), its isotropic part removed, and correlated over ``phi`` with a template by FFT.
A pattern whose lattice is the template's turned by ``theta`` has ``P(r, phi) = T(r, phi -
theta)``: the correlation peaks at ``theta``. The template is built from the data itself by
aligning a sample of patterns to their running mean a few times, so no angle is chosen by hand.
The angle found is defined modulo the lattice symmetry; that is all the network needs, because
the learned base has the same symmetry (strain is folded afterwards, see
:mod:`stemlib.ccstae.strain`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "beam_centers",
    "polar_features",
    "centred_features",
    "correlate_angles",
    "build_template",
    "angular_symmetry",
]


def beam_centers(
    patterns: torch.Tensor, *, center: tuple[float, float], radius: float
) -> torch.Tensor:
    """Each pattern's direct beam (qx, qy) px: the centre of mass of the pixels within
    ``radius`` of ``center`` brighter than half the brightest of them.

    Parameters
    ----------
    patterns
        Tensor of shape (B, 1, H, W).
    center
        Nominal beam (qx, qy) px.
    radius
        Search radius (px): the beam radius plus the largest expected descan.

    Returns
    -------
    Tensor of shape (B, 2)
    """
    h, w = patterns.shape[-2:]
    rows = torch.arange(h, dtype=torch.float32, device=patterns.device)[:, None]
    cols = torch.arange(w, dtype=torch.float32, device=patterns.device)[None, :]
    near = ((rows - center[0]) ** 2 + (cols - center[1]) ** 2) <= radius**2
    x = patterns[:, 0].float() * near
    top = x.flatten(1).max(1).values[:, None, None]
    weight = (x - 0.5 * top).clamp_min(0)
    total = weight.sum((1, 2)).clamp_min(1e-12)
    return torch.stack(
        [(weight * rows).sum((1, 2)) / total, (weight * cols).sum((1, 2)) / total], -1
    )


def polar_features(
    patterns: torch.Tensor,
    *,
    center: tuple[float, float] | torch.Tensor,
    radii: tuple[float, float],
    n_angles: int,
) -> torch.Tensor:
    """Polar resampling of the ring ``radii`` (px), isotropic part removed, unit norm.

    Parameters
    ----------
    patterns
        Tensor of shape (B, 1, H, W) (``qx`` = rows).
    center
        (qx, qy) px, or a tensor of shape (B, 2): each pattern's own centre.
    radii
        (inner, outer) px; one sample per px of radius.
    n_angles
        Samples over 360 deg, ``phi_k = 2 pi k / n_angles``.

    Returns
    -------
    Tensor of shape (B, R, n_angles)
    """
    h, w = patterns.shape[-2:]
    b = patterns.shape[0]
    r = torch.arange(radii[0], radii[1] + 0.5, 1.0, dtype=torch.float32, device=patterns.device)
    phi = torch.arange(n_angles, dtype=torch.float32, device=patterns.device) * (
        2 * np.pi / n_angles
    )
    c = (
        torch.as_tensor(center, dtype=torch.float32, device=patterns.device)
        .reshape(-1, 2)
        .expand(b, 2)
    )
    qx = c[:, 0, None, None] + r[None, :, None] * torch.cos(phi)[None, None]
    qy = c[:, 1, None, None] + r[None, :, None] * torch.sin(phi)[None, None]
    grid = torch.stack([(2 * qy + 1) / w - 1, (2 * qx + 1) / h - 1], -1)
    polar = F.grid_sample(patterns.float(), grid, align_corners=False)[:, 0]
    polar = polar - polar.mean(-1, keepdim=True)
    return polar / polar.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]


def centred_features(
    patterns: torch.Tensor,
    *,
    center: tuple[float, float],
    radius: float,
    radii: tuple[float, float],
    n_angles: int,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pattern's direct beam (:func:`beam_centers`) and its :func:`polar_features` about
    that beam, ``block`` patterns at a time: their work arrays hold a few MB per pattern
    (:func:`stemlib.ccstae.memory.search_bytes`, which sizes the block to the device).

    Parameters
    ----------
    patterns
        Tensor of shape (B, 1, H, W).
    center, radius
        Nominal beam (qx, qy) px and search radius (px) of :func:`beam_centers`.
    radii, n_angles
        The ring (inner, outer) px and angular samples of :func:`polar_features`.
    block
        Patterns per block.

    Returns
    -------
    tuple of Tensor
        The beams (B, 2) px and the features (B, R, n_angles).
    """
    beams, features = [], []
    for part in patterns.split(block):
        found = beam_centers(part, center=center, radius=radius)
        beams.append(found)
        features.append(polar_features(part, center=found, radii=radii, n_angles=n_angles))
    return torch.cat(beams), torch.cat(features)


def correlate_angles(
    features: torch.Tensor, template: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of each pattern against ``template`` and the correlation at its peak.

    Parameters
    ----------
    features
        Tensor of shape (B, R, N) from :func:`polar_features`.
    template
        Tensor of shape (R, N).

    Returns
    -------
    theta : Tensor of shape (B,)
        rad in (-pi, pi], sub-sample by a parabola through the peak; the pattern is the template
        turned by ``theta`` from +qx towards +qy.
    peak : Tensor of shape (B,)
        Normalised correlation at the peak (1 for a perfect match).
    """
    n = features.shape[-1]
    spectrum = torch.fft.rfft(features, dim=-1) * torch.fft.rfft(template, dim=-1).conj()
    corr = torch.fft.irfft(spectrum.sum(1), n=n, dim=-1)  # (B, N): sum_phi P(phi) T(phi - s)
    k = corr.argmax(-1)
    rows = torch.arange(corr.shape[0], device=corr.device)
    c0, cm, cp = corr[rows, k], corr[rows, (k - 1) % n], corr[rows, (k + 1) % n]
    denom = cm - 2 * c0 + cp
    frac = torch.where(denom < 0, 0.5 * (cm - cp) / denom, torch.zeros_like(denom)).clamp(-0.5, 0.5)
    theta = (k.float() + frac) * (2 * np.pi / n)
    theta = torch.remainder(theta + np.pi, 2 * np.pi) - np.pi
    return theta, c0 / template.norm().clamp_min(1e-12)


def _turn(features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Turn polar features back by ``theta`` (B,), i.e. ``P(phi + theta)``, by a Fourier shift."""
    n = features.shape[-1]
    freq = torch.arange(n // 2 + 1, dtype=torch.float32, device=features.device)
    phase = torch.exp(1j * freq[None, :] * theta[:, None])  # shift by -theta in phi
    return torch.fft.irfft(torch.fft.rfft(features, dim=-1) * phase[:, None, :], n=n, dim=-1)


def build_template(features: torch.Tensor, *, iterations: int = 4) -> torch.Tensor:
    """A template for :func:`correlate_angles` from the features of a sample of patterns.

    Starts from the pattern that correlates best with the others' angular autocorrelation
    (a rotation-invariant choice), then aligns every pattern to the running mean and averages,
    ``iterations`` times.

    Parameters
    ----------
    features
        Tensor of shape (B, R, N).

    Returns
    -------
    Tensor of shape (R, N), unit norm.
    """
    # Angular power spectra are rotation invariant: start from the most typical pattern.
    power = torch.fft.rfft(features, dim=-1).abs().flatten(1)
    power = power / power.norm(dim=1, keepdim=True).clamp_min(1e-12)
    typical = int((power @ power.mean(0)).argmax())
    template = features[typical]
    for _ in range(iterations):
        theta, peak = correlate_angles(features, template)
        weights = peak.clamp_min(0)[:, None, None]
        template = (_turn(features, theta) * weights).sum(0)
        template = template / template.norm().clamp_min(1e-12)
    return template


def angular_symmetry(template: torch.Tensor) -> int:
    """The n-fold symmetry (2, 4 or 6) of a template from its strongest angular order.

    The angular power spectrum is summed over radii; its strongest order from 2 to 12 decides:
    6 or 12 (or 3, a three-fold intensity on a hexagonal lattice) -> 6; 4 or 8 -> 4; else 2.
    Noise spreads over all orders and the isotropic part is order 0, so neither moves the peak.
    """
    power = torch.fft.rfft(template, dim=-1).abs().pow(2).sum(0)
    top = int(power[2:13].argmax()) + 2
    if top % 6 == 0 or top == 3:
        return 6
    if top % 4 == 0:
        return 4
    return 2
