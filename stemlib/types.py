"""Literal aliases shared by stemlib, the Prefect flows and the command line."""

from __future__ import annotations

from typing import Literal

__all__ = ["Method", "Symmetry", "Device", "LatticeKind", "NoiseModel", "DIMS", "SCAN_DIMS"]

#: Strain methods, the labels of the ``method`` dimension of a strain dataset.
Method = Literal["ccstae", "py4dstem"]
#: Rotational symmetry of the projected lattice; ``"auto"`` measures it.
Symmetry = Literal["auto", 2, 4, 6]
#: Where the CC-ST-AE trains and infers; ``"auto"`` takes CUDA when present.
Device = Literal["auto", "cpu", "cuda"]
#: Lattices the simulator draws.
LatticeKind = Literal["square", "hexagonal", "rectangular"]
#: Noise models of CONVENTIONS.md section 3.
NoiseModel = Literal["background", "dose"]

#: Dimensions of a 4D datacube, in CONVENTIONS.md's order (py4DSTEM's order).
DIMS: tuple[str, str, str, str] = ("rx", "ry", "qx", "qy")
#: Dimensions of a per-position map.
SCAN_DIMS: tuple[str, str] = ("rx", "ry")
