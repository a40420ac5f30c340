"""Calibration of a 4D-STEM scan, with explicit units (CONVENTIONS.md section 1).

Unknown values are ``None`` and are left out of the stored attributes: never a guessed number.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Calibration", "scan_coords"]


class Calibration(BaseModel):
    """Calibration of a scan; every field is optional and ``None`` means unknown.

    Examples
    --------
    >>> cal = Calibration(probe_step_nm=0.5, q_pixel_size=0.0168, q_pixel_units="1/A")
    >>> cal.merged(Calibration(probe_step_nm=0.4)).probe_step_nm
    0.4
    >>> sorted(cal.to_attrs())
    ['probe_step_nm', 'q_pixel_size', 'q_pixel_units']
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    beam_energy_keV: float | None = Field(None, gt=0, description="Beam energy (keV).")
    convergence_semiangle_mrad: float | None = Field(
        None, gt=0, description="Probe convergence semi-angle (mrad)."
    )
    probe_step_nm: float | None = Field(
        None, gt=0, description="Scan step between probe positions (nm)."
    )
    q_pixel_size: float | None = Field(
        None, gt=0, description="Detector pixel size in q_pixel_units per pixel."
    )
    q_pixel_units: str | None = Field(None, description='Units of q_pixel_size: "1/A" or "mrad".')
    qr_rotation_deg: float | None = Field(
        None, description="Rotation from scan to detector axes (deg)."
    )
    qr_flip: bool | None = Field(
        None, description="Whether the detector is flipped against the scan."
    )
    origin_px: tuple[float, float] | None = Field(
        None, description="Direct-beam position (qx, qy) in detector pixels."
    )

    def merged(self, override: Calibration | None) -> Calibration:
        """Return a copy where every field set in ``override`` replaces this one's value."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))

    def to_attrs(self) -> dict[str, Any]:
        """Known values as JSON-ready attributes (unknown ones left out)."""
        attrs = self.model_dump(exclude_none=True)
        if "origin_px" in attrs:
            attrs["origin_px"] = [float(v) for v in attrs["origin_px"]]
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Calibration:
        """Read back what :meth:`to_attrs` wrote, ignoring unrelated attributes."""
        return cls(**{k: attrs[k] for k in cls.model_fields if attrs.get(k) is not None})


def scan_coords(
    shape: tuple[int, int, int, int], calibration: Calibration
) -> dict[str, tuple[str, np.ndarray, dict[str, str]]]:
    """Coordinates of a datacube of ``shape`` (rx, ry, qx, qy) under ``calibration``.

    ``rx, ry`` are in nm (index x probe step) or ``"px"`` (index) when the step is unknown.
    ``qx, qy`` are zero at the direct beam wherever its position (``origin_px``) is known, in
    ``q_pixel_units`` when the pixel size is known too, else in ``"px"``; without the beam's
    position they are detector pixel indices in ``"px"``.

    Returns
    -------
    dict
        ``{name: (dim, values, attrs)}``, ready for :class:`xarray.Dataset` ``coords``.

    Examples
    --------
    >>> beam_only = scan_coords((1, 1, 5, 4), Calibration(origin_px=(2.0, 1.5)))
    >>> beam_only["qx"][1].tolist(), beam_only["qy"][1].tolist(), beam_only["qx"][2]["units"]
    ([-2.0, -1.0, 0.0, 1.0, 2.0], [-1.5, -0.5, 0.5, 1.5], 'px')
    """
    rx, ry, qx, qy = shape
    coords: dict[str, tuple[str, np.ndarray, dict[str, str]]] = {}
    step = calibration.probe_step_nm
    for name, n in (("rx", rx), ("ry", ry)):
        index = np.arange(n, dtype=np.float64)
        if step is None:
            coords[name] = (name, index, {"units": "px", "long_name": f"probe position {name}"})
        else:
            coords[name] = (
                name,
                index * step,
                {"units": "nm", "long_name": f"probe position {name}"},
            )
    size, units, origin = calibration.q_pixel_size, calibration.q_pixel_units, calibration.origin_px
    for axis, (name, n) in enumerate((("qx", qx), ("qy", qy))):
        index = np.arange(n, dtype=np.float64)
        long_name = f"detector {name} ({'rows' if name == 'qx' else 'columns'})"
        if origin is None:
            coords[name] = (name, index, {"units": "px", "long_name": long_name})
        elif size is None or units is None:
            coords[name] = (name, index - origin[axis], {"units": "px", "long_name": long_name})
        else:
            coords[name] = (
                name,
                (index - origin[axis]) * size,
                {"units": units, "long_name": long_name},
            )
    return coords
