"""CC-ST-AE: the Cycle-Consistent Spatial Transforming Autoencoder, trained on a scan for strain.

``ccstae_strain(scan, ...)`` trains on the scan itself (unsupervised), infers each pattern's
class and affine warp onto a learned base, and returns the strain dataset (method ``"ccstae"``).

Modules: :mod:`~stemlib.ccstae.config` (the recipe), :mod:`~stemlib.ccstae.affine` (warps and
the one conversion to PyTorch's frame), :mod:`~stemlib.ccstae.model`, :mod:`~stemlib.ccstae.loss`,
:mod:`~stemlib.ccstae.data` (streaming), :mod:`~stemlib.ccstae.rotation` (the rotation stage),
:mod:`~stemlib.ccstae.template` (starting bases), :mod:`~stemlib.ccstae.train`,
:mod:`~stemlib.ccstae.refine`, :mod:`~stemlib.ccstae.infer`, :mod:`~stemlib.ccstae.strain`
(warps -> strain), :mod:`~stemlib.ccstae.figures`, :mod:`~stemlib.ccstae.pipeline`.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop.
"""

from __future__ import annotations

from .config import PRESETS, CCSTAEConfig
from .figures import bases_figure, save_bases_png
from .model import CCSTAE, build_model
from .pipeline import ccstae_strain, train_on_scan

__all__ = [
    "CCSTAE",
    "CCSTAEConfig",
    "PRESETS",
    "bases_figure",
    "build_model",
    "ccstae_strain",
    "save_bases_png",
    "train_on_scan",
]
