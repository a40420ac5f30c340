"""The Cycle-Consistent Spatial Transforming Autoencoder (CC-ST-AE).

Order (torchvision style): blocks -> :class:`Encoder` / :class:`KSparse` / :class:`AffineHead` /
:class:`Decoder` -> :class:`CCSTAE` -> :func:`build_model`. Shapes: ``B`` patterns of ``H x W``
pixels (``qx`` = rows), ``K`` bases, ``L`` latent size.

The encoder reads a pattern and gives a latent vector; the K-sparse layer assigns it to one of
``K`` learned bases (top-1, straight-through gradient); the affine head turns latent and class
into a bounded warp ``A = R(theta) S`` and shift ``t`` (:mod:`stemlib.ccstae.affine`); the
decoder turns the one-hot class into its base pattern. The cycle warps the input onto its base
(``A``, ``t``) and the base back onto the input (the inverse).

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .affine import affine_matrix, invert, rotation, warp
from .config import CCSTAEConfig

__all__ = [
    "ResidualBlock",
    "ConvNormBlock",
    "Encoder",
    "KSparse",
    "AffineHead",
    "Affine",
    "Decoder",
    "ImageDecoder",
    "CCSTAEOutput",
    "CCSTAE",
    "derive_pools",
    "build_model",
    "accelerated",
    "mixed_precision",
]

NormLayer = Callable[[int], nn.Module]

#: Devices on which the config's ``amp`` (bf16 autocast) and ``compile`` (``torch.compile``)
#: apply; a CPU gains nothing from either.
ACCELERATORS: tuple[str, ...] = ("cuda",)


def accelerated(device: torch.device) -> bool:
    """Whether ``amp`` and ``compile`` apply on ``device`` (one of :data:`ACCELERATORS`)."""
    return device.type in ACCELERATORS


def mixed_precision(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast for the network where ``enabled`` and :func:`accelerated`; the bases and
    the warps turn it off for themselves (float32 images and coordinates)."""
    on = enabled and accelerated(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def _layer_norm(channels: int) -> nn.Module:
    """Normalisation over channels and space of each sample (any pattern size)."""
    return nn.GroupNorm(1, channels)


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions (ReLU between), a norm after the third, ReLU, plus the input.

    Input and output: (B, C, h, w).
    """

    def __init__(self, channels: int, *, norm_layer: NormLayer = _layer_norm) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            norm_layer(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x) + x


class ConvNormBlock(nn.Sequential):
    """3x3 convolution, norm, ReLU. Input (B, C_in, h, w), output (B, C_out, h, w)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, norm_layer: NormLayer = _layer_norm
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )


def derive_pools(size: int, *, smallest: int = 4) -> tuple[int, ...]:
    """Pooling factors taking ``size`` px down to a map of about ``smallest``-``2 smallest`` px.

    Factors are taken from 5, 4, 3, 2 (largest first) while they divide the size and leave at
    least ``smallest`` px; a size with no such factor is pooled by 2 with rounding up.

    Examples
    --------
    >>> derive_pools(200), derive_pools(128), derive_pools(120), derive_pools(64)
    ((5, 5, 2), (4, 4, 2), (5, 4), (4, 4))
    """
    pools: list[int] = []
    while size >= 2 * smallest:
        factor = next((f for f in (5, 4, 3, 2) if size % f == 0 and size // f >= smallest), 2)
        pools.append(factor)
        size = -(-size // factor)
    return tuple(pools)


class Encoder(nn.Module):
    """Pattern -> latent vector.

    Parameters
    ----------
    size
        (H, W) of the patterns.
    channels
        Feature channels.
    pools
        Max-pooling factors, one stage (residual block, conv-norm block, pool) each.
    latent
        Size ``L`` of the latent vector.
    downsample
        Average-pool factor applied to the input first.
    norm_layer
        Callable ``channels -> nn.Module``.

    Input (B, 1, H, W); output (B, L).

    Attributes
    ----------
    feature_map : tuple of int
        (channels, h, w) of its largest feature map, the first stage's, per pattern.
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        channels: int,
        pools: tuple[int, ...],
        latent: int,
        downsample: int = 1,
        norm_layer: NormLayer = _layer_norm,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(downsample)] if downsample > 1 else []
        layers.append(ConvNormBlock(1, channels, norm_layer=norm_layer))
        h, w = size[0] // downsample, size[1] // downsample
        self.feature_map = (channels, h, w)
        for p in pools:
            layers += [
                ResidualBlock(channels, norm_layer=norm_layer),
                ConvNormBlock(channels, channels, norm_layer=norm_layer),
                nn.MaxPool2d(p, ceil_mode=True),
            ]
            h, w = -(-h // p), -(-w // p)
        self.features = nn.Sequential(*layers)
        self.squeeze = nn.Conv2d(channels, 4, 1)
        self.fc = nn.Linear(4 * h * w, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.squeeze(self.features(x)).flatten(1)))


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hot of the largest entry; backward: the gradient passed unchanged."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's signature
        return F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


class KSparse(nn.Module):
    """Latent -> one-hot class code (top-1) with the softmax's gradient passed straight through.

    Input (B, L); output (B, K), exactly one 1 per row in the forward pass.
    """

    def __init__(self, latent: int, num_bases: int) -> None:
        super().__init__()
        self.num_bases = num_bases
        self.logits = nn.Sequential(nn.Linear(latent, num_bases), nn.LayerNorm(num_bases))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.num_bases == 1:
            return z.new_ones(z.shape[0], 1)
        return _StraightThrough.apply(torch.softmax(self.logits(z), -1))


@dataclass
class Affine:
    """Per-pattern warp parameters, each a tensor with leading dim B.

    ``scale_x, scale_y, shear, theta``: (B,), unitless and rad (CONVENTIONS.md frame);
    ``shift``: (B, 2) px (qx, qy).
    """

    scale_x: torch.Tensor
    scale_y: torch.Tensor
    shear: torch.Tensor
    theta: torch.Tensor
    shift: torch.Tensor

    def matrix(self) -> torch.Tensor:
        """``A = R(theta) S``, shape (B, 2, 2) (:func:`stemlib.ccstae.affine.affine_matrix`)."""
        return affine_matrix(self.scale_x, self.scale_y, self.shear, self.theta)

    def detach(self) -> Affine:
        return Affine(
            *(v.detach() for v in (self.scale_x, self.scale_y, self.shear, self.theta, self.shift))
        )


class AffineHead(nn.Module):
    """Latent and class code -> bounded :class:`Affine` (identity at initialisation).

    ``scale = 1 + scale_limit tanh``, ``shear = shear_limit tanh`` (one symmetric shear),
    ``theta = theta0 + rotation_limit tanh`` around the rotation search's angle ``theta0``,
    ``shift = shift0 + translation_limit tanh`` px around the measured beam offset ``shift0``
    ``shift = translation_limit tanh`` px (zero without translation).

    Inputs (B, L), (B, K), ``theta0`` (B,) rad and optional ``shift0`` (B, 2) px; output
    :class:`Affine` of batch B.
    """

    def __init__(
        self,
        latent: int,
        num_bases: int,
        *,
        scale_limit: float,
        shear_limit: float,
        rotation_limit: float,
        translation: bool,
        translation_limit: float,
    ) -> None:
        super().__init__()
        self.limits = (scale_limit, shear_limit, rotation_limit, translation_limit)
        self.translation = translation
        self.linear = nn.Linear(latent + num_bases, 6 if translation else 4)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(
        self,
        z: torch.Tensor,
        code: torch.Tensor,
        theta0: torch.Tensor,
        shift0: torch.Tensor | None = None,
    ) -> Affine:
        scale_limit, shear_limit, rotation_limit, translation_limit = self.limits
        u = torch.tanh(self.linear(torch.cat([z, code], -1)).float())
        shift = translation_limit * u[:, 4:6] if self.translation else u.new_zeros(u.shape[0], 2)
        if shift0 is not None:
            shift = shift + shift0.float()
        return Affine(
            scale_x=1 + scale_limit * u[:, 0],
            scale_y=1 + scale_limit * u[:, 1],
            shear=shear_limit * u[:, 2],
            theta=theta0 + rotation_limit * u[:, 3],
            shift=shift,
        )


class Decoder(nn.Module):
    """One-hot class code -> base pattern (non-negative).

    Parameters
    ----------
    size
        (H, W) of the patterns.
    channels
        Feature channels.
    pools
        The encoder's pools; the decoder upsamples by them in reverse order.
    num_bases
        ``K``.

    Input (K', K) one-hot codes; output (K', 1, H, W).
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        channels: int,
        pools: tuple[int, ...],
        num_bases: int,
        norm_layer: NormLayer = _layer_norm,
    ) -> None:
        super().__init__()
        self.size = size
        h, w = size
        for p in pools:
            h, w = -(-h // p), -(-w // p)
        self.start = (channels, h, w)
        self.fc = nn.Linear(num_bases, channels * h * w)
        layers: list[nn.Module] = []
        for p in reversed(pools):
            layers += [
                nn.Upsample(scale_factor=p, mode="bilinear"),
                ResidualBlock(channels, norm_layer=norm_layer),
            ]
        layers += [
            ConvNormBlock(channels, channels, norm_layer=norm_layer),
            nn.Conv2d(channels, 1, 3, padding=1),
        ]
        self.layers = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.fc(code).view(-1, *self.start))
        if tuple(x.shape[-2:]) != tuple(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear")
        return F.softplus(x)


class ImageDecoder(nn.Module):
    """One-hot class code -> base pattern, one learned image per class (a linear decoder).

    Parameters
    ----------
    size
        (H, W) of the patterns.
    num_bases
        ``K``.

    Input (K', K) one-hot codes; output (K', 1, H, W). Start it from data with
    :meth:`initialise`; it learns as fast as the encoder aligns the patterns, which a
    convolutional decoder of the CPU preset's width does not.
    """

    def __init__(self, size: tuple[int, int], *, num_bases: int) -> None:
        super().__init__()
        self.images = nn.Parameter(torch.zeros(num_bases, 1, *size))

    def initialise(self, bases: torch.Tensor) -> None:
        """Set the images to ``bases`` of shape (K, 1, H, W)."""
        with torch.no_grad():
            self.images.copy_(bases)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ak,kchw->achw", code.to(self.images.dtype), self.images)


def _fit_decoder(
    decoder: nn.Module, bases: torch.Tensor, *, steps: int = 300, lr: float = 3e-3
) -> None:
    """Start a convolutional decoder from ``bases`` (K, 1, H, W) by a short least-squares fit."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    eye = torch.eye(bases.shape[0], device=bases.device)
    for _ in range(steps):
        loss = ((decoder(eye) - bases) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclass
class CCSTAEOutput:
    """What :meth:`CCSTAE.forward` returns (B patterns, K bases, H x W px).

    Attributes
    ----------
    bases : Tensor of shape (K, 1, H, W)
        Every learned base.
    code : Tensor of shape (B, K)
        One-hot class of each pattern.
    base : Tensor of shape (B, 1, H, W)
        Each pattern's base.
    affine : Affine
        The warp base -> pattern of each pattern (batch B).
    transformed_input : Tensor of shape (B, 1, H, W)
        The input warped onto its base (compare with ``base`` in the base frame).
    transformed_base : Tensor of shape (B, 1, H, W)
        The base warped onto the input by the inverse warp (compare with the input).
    """

    bases: torch.Tensor
    code: torch.Tensor
    base: torch.Tensor
    affine: Affine
    transformed_input: torch.Tensor
    transformed_base: torch.Tensor


class CCSTAE(nn.Module):
    """The cycle-consistent spatial transforming autoencoder.

    Parameters
    ----------
    encoder, sparse, head, decoder
        The parts (see :func:`build_model`).
    center
        (qx, qy) px of the direct beam, the centre of every warp. Kept as a non-persistent
        float64 buffer ``_center`` of shape (2,): ``.to(device)`` moves it, state dicts and
        checkpoints do not hold it, and ``torch.compile`` takes it as an input, so models of
        scans with different centres share one compiled graph (a Python float would be a
        constant of the graph: one recompilation per centre, and eager running after
        Dynamo's recompile limit). :attr:`center` reads it back as two floats. float64 keeps
        the warps' numbers those of float centres; a cast of the whole model (``.float()``)
        would round it.
    interpolation
        ``"bilinear"`` or ``"bicubic"``.

    Forward: ``x`` (B, 1, H, W), optional ``theta0`` (B,) rad (the rotation search's angle;
    zero if None) and ``shift0`` (B, 2) px (the measured direct-beam offset; zero if None) ->
    :class:`CCSTAEOutput`. The encoder sees the input turned by ``theta0`` and centred so that
    it only has to refine; the warps are applied once to the original input.
    """

    _center: torch.Tensor

    def __init__(
        self,
        encoder: Encoder,
        sparse: KSparse,
        head: AffineHead,
        decoder: Decoder | ImageDecoder,
        *,
        center: tuple[float, float],
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.encoder, self.sparse, self.head, self.decoder = encoder, sparse, head, decoder
        self.register_buffer(
            "_center",
            torch.tensor([float(center[0]), float(center[1])], dtype=torch.float64),
            persistent=False,
        )
        self.interpolation = interpolation

    @property
    def center(self) -> tuple[float, float]:
        """(qx, qy) px of the direct beam, as two floats (read from the buffer ``_center``,
        which the forward pass uses; reading it on CUDA waits for the device)."""
        qx, qy = self._center.tolist()
        return (qx, qy)

    @property
    def num_bases(self) -> int:
        return self.sparse.num_bases

    def bases(self) -> torch.Tensor:
        """All bases, shape (K, 1, H, W)."""
        eye = torch.eye(self.num_bases, device=next(self.decoder.parameters()).device)
        return self.decoder(eye)

    def initialise_bases(self, bases: torch.Tensor) -> None:
        """Start the decoder from ``bases`` (K, 1, H, W), e.g. the mean of the patterns turned
        by the rotation stage's angles."""
        bases = bases.to(next(self.decoder.parameters()).device)
        if isinstance(self.decoder, ImageDecoder):
            self.decoder.initialise(bases)
        else:
            _fit_decoder(self.decoder, bases)

    def encode(
        self,
        x: torch.Tensor,
        theta0: torch.Tensor | None = None,
        shift0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Affine]:
        """Class code (B, K) and :class:`Affine` of ``x`` (B, 1, H, W)."""
        if theta0 is None:
            theta0 = x.new_zeros(x.shape[0])
        theta0 = theta0.float()
        start = theta0.new_zeros(x.shape[0], 2) if shift0 is None else shift0.float()
        with torch.autocast(x.device.type, enabled=False):
            turned = warp(x.float(), rotation(theta0), start, center=self._center)
        z = self.encoder(turned)
        code = self.sparse(z)
        return code, self.head(z, code, theta0, shift0)

    def cycle(
        self, x: torch.Tensor, code: torch.Tensor, affine: Affine, bases: torch.Tensor | None = None
    ) -> CCSTAEOutput:
        """Warp ``x`` (B, 1, H, W) onto its base and the base back, for given code and affine.

        The bases and the warps run in float32 even under autocast: the warps' coordinates need
        its precision, and bases rounded to bf16 (up to 0.4 %) would be what the patterns are
        registered onto.
        """
        with torch.autocast(x.device.type, enabled=False):
            bases = (self.bases() if bases is None else bases).float()
            x = x.float()
            base = torch.einsum("bk,kchw->bchw", code.float(), bases)
            A, t = affine.matrix().float(), affine.shift.float()
            transformed_input = warp(x, A, t, center=self._center, mode=self.interpolation)
            transformed_base = warp(
                base, *invert(A, t), center=self._center, mode=self.interpolation
            )
        return CCSTAEOutput(bases, code, base, affine, transformed_input, transformed_base)

    def forward(
        self,
        x: torch.Tensor,
        theta0: torch.Tensor | None = None,
        shift0: torch.Tensor | None = None,
    ) -> CCSTAEOutput:
        code, affine = self.encode(x, theta0, shift0)
        return self.cycle(x, code, affine)


def build_model(
    config: CCSTAEConfig, *, pattern_shape: tuple[int, int], center: tuple[float, float]
) -> CCSTAE:
    """Build a CC-ST-AE for patterns of ``pattern_shape`` (H, W) from ``config``.

    The pools are ``config.pools`` or :func:`derive_pools` of the encoder's input size; a
    convolutional decoder mirrors them at full size.

    Examples
    --------
    >>> model = build_model(CCSTAEConfig.preset("cpu"), pattern_shape=(64, 64), center=(32.0, 32.0))
    >>> out = model(torch.rand(2, 1, 64, 64))
    >>> tuple(out.transformed_input.shape), tuple(out.affine.matrix().shape), tuple(out.bases.shape)
    ((2, 1, 64, 64), (2, 2, 2), (1, 1, 64, 64))
    """
    from .config import check_config

    check_config(config, pattern_shape=pattern_shape)
    size = (int(pattern_shape[0]), int(pattern_shape[1]))
    encoder_pools = config.pools or derive_pools(min(size) // config.encoder_downsample)
    decoder_pools = config.pools or derive_pools(min(size))
    encoder = Encoder(
        size,
        channels=config.channels,
        pools=encoder_pools,
        latent=config.latent,
        downsample=config.encoder_downsample,
    )
    sparse = KSparse(config.latent, config.num_bases)
    head = AffineHead(
        config.latent,
        config.num_bases,
        scale_limit=config.scale_limit,
        shear_limit=config.shear_limit,
        rotation_limit=config.rotation_limit,
        translation=config.translation,
        translation_limit=config.translation_limit,
    )
    decoder: Decoder | ImageDecoder
    if config.decoder == "conv":
        decoder = Decoder(
            size, channels=config.channels, pools=decoder_pools, num_bases=config.num_bases
        )
    else:
        decoder = ImageDecoder(size, num_bases=config.num_bases)
    return CCSTAE(encoder, sparse, head, decoder, center=center, interpolation=config.interpolation)
