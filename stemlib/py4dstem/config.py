"""Options of the py4DSTEM baseline. Every one has a data-derived default; set one only to
override what the data say."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..ellipse import DetectorEllipse

__all__ = ["Py4DSTEMConfig"]


class Py4DSTEMConfig(BaseModel):
    """Overrides of the py4DSTEM baseline (template correlation + per-pattern lattice fit).

    Examples
    --------
    >>> Py4DSTEMConfig().threshold_sigma
    5.0
    >>> Py4DSTEMConfig(disk_radius_px=4.0).disk_radius_px
    4.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: Literal["auto", "vacuum", "synthetic"] = Field(
        "auto",
        description="Correlation template: the mean direct beam of the vacuum patterns where the "
        "scan has some (auto), else a synthetic disk of the measured direct-beam radius.",
    )
    disk_radius_px: float | None = Field(
        None,
        gt=0,
        description="Direct-beam disk radius (px); None measures it on the mean pattern.",
    )
    kernel_radii: tuple[float, float] = Field(
        (1.0, 2.0),
        description="Inner and outer radii of py4DSTEM's sigmoid kernel trench, in disk radii.",
    )
    corr_power: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Correlation power: 1 cross, 0 phase, between hybrid correlation.",
    )
    sigma_dp: float | None = Field(
        None,
        ge=0,
        description="Gaussian smoothing (px) of each pattern before the correlation; None: "
        "(6 px - disk radius) / 4, at least 0. py4DSTEM's DFT up-sampling of a correlation peak "
        "assumes it is band-limited: the peak of a small disk with a sharp edge is not, and is "
        "biased by a tenth of a pixel unless smoothed; large disks need no smoothing, which would "
        "only weigh the intensity gradients inside them.",
    )
    sigma_cc: float | None = Field(
        None,
        ge=0,
        description="Gaussian smoothing (px) of the correlation before peak finding; None: "
        "half the disk radius, at most 2.",
    )
    subpixel: Literal["poly", "multicorr"] = Field(
        "multicorr",
        description="py4DSTEM's sub-pixel refinement of correlation peaks: parabolic or DFT "
        "upsampling.",
    )
    upsample_factor: int = Field(
        8, ge=4, le=128, description="DFT upsampling of the sub-pixel refinement."
    )
    threshold_sigma: float = Field(
        5.0,
        gt=0,
        description="Detection threshold: correlation peaks this many noise standard "
        "deviations above zero (noise measured on the data).",
    )
    min_beam_fraction: float = Field(
        1e-4,
        ge=0,
        lt=1,
        description="Detection floor as a fraction of the direct beam's correlation peak "
        "(noise-free "
        "data have no noise to set a threshold, only numerical side lobes).",
    )
    min_relative: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="Peaks fainter than this fraction of a pattern's brightest Bragg peak are "
        "dropped.",
    )
    max_peaks: int = Field(
        70, ge=3, description="At most this many peaks per pattern, brightest first."
    )
    index_tolerance: float = Field(
        0.15,
        gt=0,
        lt=0.5,
        description="A disk is indexed when within this fraction of the shortest lattice vector "
        "of a lattice point.",
    )
    prior_tolerance: float = Field(
        0.12,
        gt=0,
        lt=0.5,
        description="Relative tolerance between a pattern's lattice and the scan's typical lattice "
        "shape (lengths; the angle's tolerance is the same in rad).",
    )
    min_disks: int = Field(4, ge=2, description="Fewest indexed Bragg disks for a valid position.")
    min_indexed_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A valid position's lattice indexes at least this fraction of its summed Bragg "
        "peak intensity (noise peaks that happen to align do not).",
    )
    min_sample_indexed: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Fraction of the sampled patterns that must show a lattice for the scan's "
        "lattice shape to be trusted.",
    )
    sample_patterns: int = Field(
        256, ge=16, description="Patterns read to measure the direct beam, noise and lattice shape."
    )
    min_vacuum_patterns: int = Field(
        8,
        ge=1,
        description="Sampled patterns without Bragg disks needed to build a vacuum template.",
    )
    block_patterns: int = Field(256, ge=1, description="At most this many patterns per Dask task.")
    ellipse: DetectorEllipse = Field(
        default_factory=DetectorEllipse,
        description="The detector's elliptic distortion, removed from every lattice before the "
        "strain: measured on the reference lattice, or given.",
    )
