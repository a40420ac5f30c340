"""The CC-ST-AE recipe as data: model sizes, affine bounds, loss, schedule, training and refinement.

Two presets: ``"cpu"`` (a small model that trains on a 32 x 32 scan of 128 px patterns in
minutes on a laptop's CPU) and ``"gpu"`` (the paper's widths and epochs). A config is stored in
every checkpoint and in the result's provenance, and can be read from YAML or JSON
(``stemflow strain ... --config FILE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..config_file import read_mapping, validated
from ..ellipse import DetectorEllipse
from ..errors import InputError
from ..masks import MaskSchedule
from ..types import Device

__all__ = ["CCSTAEConfig", "PRESETS", "check_config", "resolve_device"]


class CCSTAEConfig(BaseModel):
    """Everything that defines a CC-ST-AE run (see :func:`stemlib.ccstae.ccstae_strain`).

    Examples
    --------
    >>> cfg = CCSTAEConfig.preset("cpu")
    >>> cfg.channels, cfg.num_bases
    (16, 1)
    >>> CCSTAEConfig.model_validate_json(cfg.model_dump_json()) == cfg
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model (torchvision style: sizes, the pools derived from the pattern size unless given).
    channels: int = Field(
        128, ge=1, description="Feature channels of the encoder and decoder convolutions."
    )
    latent: int = Field(20, ge=1, description="Size of the latent vector.")
    num_bases: int = Field(
        1, description="Learned base patterns (classes); 2 separates sample and vacuum."
    )
    pools: tuple[int, ...] | None = Field(
        None,
        description="Max-pooling factors of the encoder (decoder upsamples by the same); None "
        "derives them.",
    )
    decoder: Literal["image", "conv"] = Field(
        "image",
        description="Base decoder: one learned image per class, or the paper's convolutional "
        "decoder.",
    )
    encoder_downsample: int = Field(
        1,
        ge=1,
        description="Average-pool the encoder's input by this factor (warps stay at full size).",
    )
    # Affine head bounds (base -> pattern warp, CONVENTIONS.md frame).
    scale_limit: float = Field(0.05, gt=0, lt=0.5, description="Scale = 1 + scale_limit tanh(z).")
    shear_limit: float = Field(
        0.1, gt=0, lt=0.5, description="Symmetric shear = shear_limit tanh(z)."
    )
    rotation_limit: float = Field(
        0.1,
        gt=0,
        le=3.2,
        description="Rotation refinement (rad) around the rotation search's angle.",
    )
    translation: bool = Field(True, description="Learn a shift of the whole pattern (descan).")
    translation_limit: float = Field(
        4.0, gt=0, description="Shift = translation_limit tanh(z), px."
    )
    # Loss.
    mask: MaskSchedule | None = Field(
        None,
        description="Ring-mask schedule (px); None derives it from the direct beam and pattern "
        "size.",
    )
    noise_model: Literal["auto", "gaussian", "poisson"] = Field(
        "auto",
        description="gaussian: least squares on transformed intensities; poisson: linear counts "
        "fitted by Poisson likelihood (low dose); auto: poisson for integer counts under 1 count "
        "per ring pixel. Its 1/mu weights stress the faint pixels: on clean multislice Si it "
        "doubled the error (0.80/1.33/0.74e-3 against 0.43/0.46/0.28), so it pays only where "
        "shot noise dominates (at 1,000 electrons per pattern gaussian's exx error was 4.33e-3, "
        "poisson's 2.92e-3).",
    )
    intensity: Literal["sqrt", "linear", "log"] = Field(
        "sqrt",
        description="Intensity transform of the gaussian noise model (sqrt stabilises Poisson "
        "noise).",
    )
    disk_gains: bool = Field(
        False,
        description="Refine with one gain per Bragg disk (disk intensities that differ from the "
        "base's). Not for lattices whose disk intensities have less symmetry than their "
        "positions (WS2: three-fold intensities on a six-fold lattice): the gains absorb the "
        "intensities that tell the branches apart.",
    )
    rigid_disks: bool = Field(
        True,
        description="Register each Bragg disk as moving rigidly with the lattice (its size and "
        "shape are the probe's) rather than stretched with the whole pattern, which biases the "
        "strain towards zero.",
    )
    background: bool = Field(
        True,
        description="Fit an isotropic background that does not move with the lattice when "
        "registering.",
    )
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="Warp interpolation."
    )
    l1_base: float = Field(1e-6, ge=0, description="Weight of the L1 norm of the bases.")
    scale_hinge: float = Field(0.03, ge=0, description="Scales beyond 1 +- this are penalised.")
    scale_penalty: float = Field(10.0, ge=0, description="Weight of the scale hinge.")
    shear_hinge: float = Field(0.03, ge=0, description="Shears beyond +- this are penalised.")
    shear_penalty: float = Field(1.0, ge=0, description="Weight of the shear hinge.")
    outlier_factor: float = Field(
        5.0,
        gt=1,
        description="Per-pattern losses above this x the batch median are log-compressed; "
        "batches above this x the running loss are skipped.",
    )
    # Rotation search (the stage that finds any rotation before the network refines it).
    search_angles: int = Field(
        720, ge=36, description="Angular samples of the polar correlation (360 deg)."
    )
    search_patterns: int = Field(
        2048, ge=2, description="Patterns used to build the search template."
    )
    # Starting bases (registration and averaging on the sample, see stemlib.ccstae.template).
    template_rounds: int = Field(
        2, ge=0, description="Register-then-average rounds that sharpen the starting bases."
    )
    template_steps: int = Field(
        6, ge=1, description="Gauss-Newton steps per registration of those rounds."
    )
    # Training.
    epochs: int = Field(20, ge=0, description="Training epochs (0 uses the rotation search alone).")
    batch_size: int = Field(
        32,
        ge=1,
        description="Patterns per training step (passed in slices whose gradients are summed "
        "where the step would not fit in the device's free memory).",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (cosine decay to lr / 20).")
    base_lr_factor: float = Field(
        0.0,
        ge=0,
        description="Learning rate of the decoder (the bases) relative to lr; 0 keeps the sharp "
        "bases of the starting stage, which gradient steps on noisy batches blur.",
    )
    seed: int = Field(42, description="Seed of weights, shuffling and sampling.")
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes streaming from the store (a script using them "
        "needs the `if __name__ == '__main__':` guard, as Dask's processes do).",
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    compile: bool = Field(False, description="torch.compile the model on CUDA.")
    # Inference and per-pattern refinement.
    infer_batch_size: int = Field(
        256,
        ge=1,
        description="Patterns per inference step (and per block of the rotation search), at "
        "most: fewer where they would not fit in the device's free memory (half a GPU's, a "
        "quarter of a CPU's).",
    )
    neighbour_starts: bool = Field(
        True,
        description="Refine each pattern a second time from the median warp of its eight "
        "neighbours and keep the better fit (escapes the local minima of low-dose likelihoods; "
        "each answer is still the pattern's own fit). Doubles the refinement's cost.",
    )
    refine_steps: int = Field(
        6,
        ge=0,
        description="Gauss-Newton steps refining each pattern's affine against its base (0: "
        "network only).",
    )
    ellipse: DetectorEllipse = Field(
        default_factory=DetectorEllipse,
        description="The detector's elliptic distortion, removed from every warp and base "
        "before the strain: measured on the reference region's mean pattern, or given.",
    )

    @property
    def last_epoch(self) -> int:
        """The epoch whose mask inference uses: the last one trained (0 without training)."""
        return max(self.epochs - 1, 0)

    @classmethod
    def preset(cls, name: Literal["cpu", "gpu"], **overrides: Any) -> CCSTAEConfig:
        """The ``"cpu"`` or ``"gpu"`` recipe, with ``overrides`` applied."""
        if name not in PRESETS:
            raise InputError(f"preset {name!r} does not exist; use one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def for_device(cls, device: Device | torch.device = "auto", **overrides: Any) -> CCSTAEConfig:
        """The preset for where the model runs (``"gpu"`` on CUDA, else ``"cpu"``), with
        ``overrides`` applied."""
        dev = resolve_device(device)
        return cls.preset("gpu" if dev.type == "cuda" else "cpu", **overrides)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        preset: Literal["auto", "cpu", "gpu"] = "auto",
        device: Device | torch.device = "auto",
    ) -> CCSTAEConfig:
        """Read a config from YAML or JSON: its fields change a preset, the file's ``preset``
        key if it has one, else ``preset`` (``"auto"``: the one for ``device``). So a file
        that only says ``epochs: 4`` keeps the small model on a CPU.

        Raises
        ------
        InputError
            If the file does not exist, is not valid YAML/JSON, is not a mapping, or holds a
            bad field (the sentence names the file).
        """
        data = read_mapping(path, cls)
        name = data.pop("preset", None) or preset
        if name == "auto":
            return validated(path, cls.for_device, device, **data)
        return validated(path, cls.preset, name, **data)


#: The named recipes. ``cpu``: 16 channels, encoder on a 2x downsampled input, 12 epochs.
#: ``gpu``: the paper's 128 channels and 20 epochs with larger batches.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "channels": 16,
        "latent": 20,
        "encoder_downsample": 2,
        "epochs": 12,
        "batch_size": 32,
        "lr": 2e-3,
    },
    "gpu": {
        "channels": 128,
        "latent": 20,
        "epochs": 20,
        "batch_size": 256,
        "lr": 1e-3,
        "num_workers": 4,
        "infer_batch_size": 2048,
        "compile": True,
    },
}


def resolve_device(device: Device | str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; a ``torch.device`` (``cuda:1``) as it is.

    Raises
    ------
    InputError
        For an unknown name, or ``"cuda"`` on a machine without CUDA.
    """
    if isinstance(device, torch.device):
        return device
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device={device!r} is not known; use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "device='cuda' was requested but this machine has no CUDA GPU; use --device auto or "
            "cpu."
        )
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_config(config: CCSTAEConfig, *, pattern_shape: tuple[int, int]) -> None:
    """Refuse a config that cannot run on patterns of ``pattern_shape`` (H, W).

    Raises
    ------
    InputError
        ``num_bases < 1``; a mask ring reaching beyond the pattern; pools that shrink the
        pattern below one pixel.
    """
    if config.num_bases < 1:
        raise InputError(
            f"num_bases={config.num_bases} must be 1 or more (1 for one crystal, 2 with vacuum)."
        )
    h, w = pattern_shape
    half = min(h, w) / 2
    if config.mask is not None:
        outer = max(config.mask.start[1], config.mask.end[1])
        if outer > half:
            raise InputError(
                f"the mask's outer radius {outer:g} px is larger than the {h}x{w} px pattern "
                f"allows "
                f"({half:g} px); pass a smaller mask."
            )
        inner = max(config.mask.start[0], config.mask.end[0])
        if inner >= min(config.mask.start[1], config.mask.end[1]):
            raise InputError(
                f"the mask ring is empty (inner {inner:g} px >= outer); pass inner < outer."
            )
    if config.pools is not None:
        size = min(h, w) // config.encoder_downsample
        for p in config.pools:
            size = -(-size // p)
        if size < 1 or any(p < 2 for p in config.pools):
            raise InputError(
                f"pools={config.pools} do not fit a {h}x{w} px pattern; pass factors >= 2 or "
                f"leave it unset."
            )
