"""Simulated 4D-STEM scans of Voronoi grains, with the true strain of every probe position.

Each grain carries a deformation ``F = R(theta) (I + eps)`` of one reference lattice (square,
hexagonal or rectangular); one grain is the unstrained, unrotated reference. A position's
pattern shows Bragg disks at ``g' = F^-T g`` around the direct beam, with what makes real data
hard, each switchable: a finite disk radius with a soft edge, intensities falling with ``|g|``,
an intensity gradient inside the disks (as thick crystals give), a descan drift of the whole
pattern across the scan, an elliptic distortion of the detector and a vacuum region.

The truth follows CONVENTIONS.md: ``exx, eyy, exy`` are ``V - I`` of ``F = V R`` in the
detector frame (``qx`` = pattern rows = axis 2 of the datacube, ``qy`` = columns), ``theta`` the
angle of ``R`` in rad from +qx towards +qy, wrapped into ``(-pi/n, pi/n]`` for the lattice's
n-fold symmetry. It is drawn up front (small: a few numbers per position); the patterns are
rendered lazily, chunk by chunk, by dask, each chunk from the truth of its own positions. The
result is deterministic per seed, whatever the chunking or the number of workers, and a
256 x 256 scan of 256 x 256 patterns streams to a store without being held in memory.

References
----------
Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
Transforming Autoencoders", NeurIPS 2023 ML4PS workshop (the benchmark this reproduces).
Munshi et al., "Disentangling multiple scattering with deep learning: application to strain
mapping from electron diffraction patterns", npj Comput. Mater. 8, 254 (2022) (grain scans).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from pydantic import BaseModel, ConfigDict, Field
from scipy.spatial import cKDTree

from .calibration import Calibration, scan_coords
from .ellipse import ellipse_matrix
from .errors import InputError
from .io.scan_store import WriteResult, choose_layout, finished_scan, write_scan
from .provenance import software_versions, utc_now
from .strain import rotation_matrix, strain_from_deformation
from .truth import truth_dataset
from .types import DIMS, SCAN_DIMS, LatticeKind

__all__ = [
    "SimulationConfig",
    "simulate",
    "simulation_recipe",
    "write_simulation",
    "LATTICE_SYMMETRY",
]

#: Rotational symmetry of each lattice in projection (the ``truth_symmetry`` attribute).
LATTICE_SYMMETRY: dict[str, int] = {"square": 4, "hexagonal": 6, "rectangular": 2}

#: Soft-edge widths beyond the radius where a disk is taken to end (its tail is below 2e-4).
_TAIL_EDGES = 4.0
#: Soft-edge widths beyond the radius where the rendered profile is cut to zero (below 1e-6).
_CUT_EDGES = 14.0
#: Largest eigenvalue of eps per unit of ``max_strain`` (``|exx|, |eyy|, |exy| <= m``).
_EPS_BOUND = 1.0 + math.sqrt(2.0)
#: Columns of the per-position rendering parameters.
_G, _ORIGIN, _DIRECTION, _VACUUM = slice(0, 4), slice(4, 6), slice(6, 8), 8
_PARAMS = 9

_Positive = Annotated[int, Field(ge=1)]


class SimulationConfig(BaseModel):
    """What to simulate: scan and pattern size, grains, lattice, and what makes it hard.

    The defaults give clean, ideal patterns (no gradient, descan, ellipticity or vacuum);
    :meth:`hard` gives the hardest settings. Lengths are detector pixels (px); ``qx`` = pattern
    rows, ``qy`` = columns.

    Examples
    --------
    >>> SimulationConfig(scan=(16, 16), pattern=64).resolved_spacing_px
    8.0
    >>> SimulationConfig.hard(scan=(8, 8)).gradient > 0
    True
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    scan: tuple[_Positive, _Positive] = Field((64, 64), description="Probe positions (RX, RY).")
    pattern: int = Field(
        128, ge=8, le=4096, description="Detector pixels per side: patterns are N x N."
    )
    grains: int = Field(8, ge=1, description="Voronoi grains; one is the unstrained reference.")
    lattice: LatticeKind = Field(
        "square", description="Reference lattice: square, hexagonal or rectangular."
    )
    max_strain: float = Field(
        0.02,
        ge=0,
        le=0.1,
        description="Each of eps_xx, eps_yy, eps_xy drawn uniform in [-max, max] per grain.",
    )
    max_rot_deg: float = Field(
        45.0, ge=0, le=180, description="Grain rotation drawn uniform in [-max, max] deg."
    )
    seed: int = Field(
        0, ge=0, description="Seed of every random draw (grains, strains, rotations)."
    )
    spacing_px: float | None = Field(
        None, gt=0, description="|g1| of the reference lattice in px; None: pattern / 8."
    )
    aspect: float = Field(
        1.25, ge=1.05, le=3.0, description="|g2| / |g1| of the rectangular lattice."
    )
    disk_radius_px: float | None = Field(
        None, gt=0, description="Bragg disk radius in px; None: spacing / 5."
    )
    edge_px: float = Field(
        0.25,
        gt=0,
        le=5,
        description="Soft-edge width (px): disk profile 1 / (1 + exp((r - radius) / edge)).",
    )
    falloff: float = Field(
        2.0,
        ge=0.2,
        le=100,
        description="Disk intensity exp(-(|g| / (falloff x spacing))^2): fainter with |g|.",
    )
    direct_beam: float = Field(2.0, ge=0, le=1000, description="Intensity of the direct-beam disk.")
    gradient: float = Field(
        0.0,
        ge=0,
        le=0.9,
        description="Intensity slope inside each disk, 1 + gradient x offset / radius "
        "along a direction drawn per grain (thick-crystal dynamical effects).",
    )
    descan_px: tuple[float, float] = Field(
        (0.0, 0.0),
        description="Direct-beam drift (px): along qx from the first to the last scan row, "
        "along qy from the first to the last scan column.",
    )
    ellipticity: float = Field(
        0.0,
        ge=0,
        le=0.2,
        description="Elliptic detector distortion: axes scaled by 1 + e/2 and 1 - e/2.",
    )
    ellipse_angle_deg: float = Field(
        0.0, ge=-180, le=180, description="Long axis of the ellipse, deg from +qx towards +qy."
    )
    vacuum: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Fraction of positions without crystal (a band at one edge of the "
        "scan): direct beam only, truth NaN, grain_id -1.",
    )

    @classmethod
    def hard(cls, **overrides: Any) -> SimulationConfig:
        """The hardest settings: soft disk edges, steep intensity falloff, strong gradients inside
        the disks, descan, elliptic distortion and a vacuum region; ``overrides`` set any field."""
        settings: dict[str, Any] = {
            "edge_px": 0.6,
            "falloff": 1.2,
            "direct_beam": 5.0,
            "gradient": 0.4,
            "descan_px": (3.0, -2.0),
            "ellipticity": 0.03,
            "ellipse_angle_deg": 25.0,
            "vacuum": 0.1,
        }
        return cls(**{**settings, **overrides})

    @property
    def resolved_spacing_px(self) -> float:
        """``spacing_px``, or ``pattern / 8`` when it is None."""
        return float(self.spacing_px if self.spacing_px is not None else self.pattern / 8)

    @property
    def resolved_disk_radius_px(self) -> float:
        """``disk_radius_px``, or a fifth of the spacing when it is None."""
        return float(
            self.disk_radius_px if self.disk_radius_px is not None else self.resolved_spacing_px / 5
        )

    @property
    def symmetry(self) -> int:
        """n of the lattice's n-fold symmetry in projection: 4, 6 or 2."""
        return LATTICE_SYMMETRY[self.lattice]

    def reference_basis(self) -> np.ndarray:
        """Reference reciprocal basis in px, shape (2, 2): columns ``g1, g2`` as (qx, qy)."""
        s = self.resolved_spacing_px
        if self.lattice == "square":
            return np.array([[s, 0.0], [0.0, s]])
        if self.lattice == "hexagonal":
            return np.array([[s, s / 2], [0.0, s * math.sqrt(3.0) / 2]])
        return np.array([[s, 0.0], [0.0, s * self.aspect]])

    def ellipse_matrix(self) -> np.ndarray:
        """Detector distortion ``E``, shape (2, 2): a point ``u`` from the beam lands at ``E u``."""
        return ellipse_matrix(self.ellipticity, self.ellipse_angle_deg)


def _check(config: SimulationConfig) -> None:
    """Refuse a configuration that cannot give a usable scan (one sentence, the fix)."""
    rx, ry = config.scan
    if config.grains > rx * ry:
        raise InputError(
            f"grains={config.grains} is more than the {rx * ry} probe positions of scan={rx},{ry}; "
            f"use --grains <= {rx * ry} or a larger --scan."
        )
    extent, limit, reach, room = _geometry(config)
    if extent > limit and config.spacing_px is not None:
        raise InputError(
            f"disk_radius_px={config.resolved_disk_radius_px:g} with edge_px={config.edge_px:g} "
            f"is too large for spacing_px={config.spacing_px:g}: neighbouring disks would (nearly) "
            f"overlap; use a radius below {max(limit - _TAIL_EDGES * config.edge_px, 0):.2f} px or "
            "a larger spacing."
        )
    if extent > limit or reach > room:
        smallest = next(
            (
                n
                for n in range(config.pattern + 1, 4097)
                if _fits(config.model_copy(update={"pattern": n}))
            ),
            None,
        )
        why = (
            "its disks would (nearly) overlap"
            if extent > limit
            else f"its first-order disks reach {reach:.1f} px from the direct beam and only "
            f"{room:.0f} px fit"
        )
        fix = f"use --pattern >= {smallest}" if smallest else "use a smaller --max-strain"
        raise InputError(
            f"pattern={config.pattern} px is too small for the lattice: {why}; {fix}"
            + (" or a smaller spacing_px." if config.spacing_px is not None else ".")
        )


def _geometry(config: SimulationConfig) -> tuple[float, float, float, float]:
    """(extent, limit, reach, room) in px: how far a disk reaches from its lattice point and the
    most it may; how far the first-order disks reach from the pattern centre and the room there."""
    g = config.reference_basis()
    k = _EPS_BOUND * config.max_strain
    extent = config.resolved_disk_radius_px + _TAIL_EDGES * config.edge_px
    # A disk must reach less than half a lattice cell along each lattice coordinate of any
    # grain: rows of (F^-T G)^-1 = G^-1 F^T are at most (1 + k) times those of G^-1.
    limit = 0.5 / (np.linalg.norm(np.linalg.inv(g), axis=1).max() * (1 + k))
    longest = np.linalg.norm(g, axis=0).max() / (1 - k)
    reach = (longest + extent) * (1 + config.ellipticity / 2) + max(
        abs(d) for d in config.descan_px
    ) / 2
    return extent, limit, reach, config.pattern / 2 - 1


def _fits(config: SimulationConfig) -> bool:
    extent, limit, reach, room = _geometry(config)
    return extent <= limit and reach <= room


def _draw_truth(config: SimulationConfig) -> dict[str, np.ndarray]:
    """Grains, deformations, origins and gradient directions of every position (numpy, small)."""
    rx, ry = config.scan
    rng = np.random.default_rng(config.seed)
    # Every draw happens whatever the options, so changing one option never reshuffles another.
    seeds = rng.choice(rx * ry, size=config.grains, replace=False)
    m, rot = config.max_strain, math.radians(config.max_rot_deg)
    eps = rng.uniform(-m, m, size=(config.grains, 3))
    theta = rng.uniform(-rot, rot, size=config.grains)
    direction_angle = rng.uniform(0.0, 2 * math.pi, size=config.grains)
    vacuum_angle = rng.uniform(0.0, 2 * math.pi)

    positions = np.stack(np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij"), -1).reshape(
        -1, 2
    )
    # Seeds sit on distinct positions, so every grain owns at least its seed's position.
    _, grain = cKDTree(positions[seeds].astype(np.float64)).query(positions.astype(np.float64))
    grain = grain.reshape(rx, ry).astype(np.int32)

    in_vacuum = np.zeros(rx * ry, dtype=bool)
    n_vacuum = int(round(config.vacuum * rx * ry))
    if n_vacuum:
        along = positions @ np.array([math.cos(vacuum_angle), math.sin(vacuum_angle)])
        in_vacuum[np.argsort(-along, kind="stable")[:n_vacuum]] = True
    vacuum = in_vacuum.reshape(rx, ry)

    sizes = np.bincount(grain[~vacuum], minlength=config.grains)
    reference = int(np.argmax(sizes))
    eps[reference] = 0.0
    theta[reference] = 0.0
    stretch = np.eye(2) + np.stack(
        [np.stack([eps[:, 0], eps[:, 2]], -1), np.stack([eps[:, 2], eps[:, 1]], -1)], -2
    )
    F = rotation_matrix(theta) @ stretch  # (G, 2, 2), F = R(theta) (I + eps)

    scan_frac = [np.linspace(-0.5, 0.5, n) if n > 1 else np.zeros(1) for n in (rx, ry)]
    origin = np.empty((rx, ry, 2))
    origin[..., 0] = config.pattern // 2 + config.descan_px[0] * scan_frac[0][:, None]
    origin[..., 1] = config.pattern // 2 + config.descan_px[1] * scan_frac[1][None, :]
    direction = np.stack([np.cos(direction_angle), np.sin(direction_angle)], -1)
    return {
        "grain": np.where(vacuum, -1, grain).astype(np.int32),
        "F_grain": F,
        "grain_of_position": grain,
        "vacuum": vacuum,
        "reference": (grain == reference) & ~vacuum,
        "origin": origin,
        "direction": direction[grain],
    }


def _render_pattern(
    p: np.ndarray, rows: np.ndarray, cols: np.ndarray, opts: dict[str, Any]
) -> np.ndarray:
    """One pattern of shape (N, N), summing to 1, from one row of rendering parameters.

    Pixel ``(i, j)`` sits at ``u = E^-1 ((i, j) - origin)`` in the undistorted frame, where the
    disks are circles of the given radius at the lattice points ``G n``. A disk reaches less than
    half a cell from its lattice point along each lattice coordinate (checked by
    :func:`_check`), so the only disk that can cover a pixel is that of ``n = round(G^-1 u)``.
    Computed in float32: positions are exact to about 1e-5 px.
    """
    e_inv, radius, edge = opts["e_inv"], opts["radius"], opts["edge"]
    dx, dy = rows - np.float32(p[_ORIGIN][0]), cols - np.float32(p[_ORIGIN][1])
    u0 = np.float32(e_inv[0, 0]) * dx + np.float32(e_inv[0, 1]) * dy
    u1 = np.float32(e_inv[1, 0]) * dx + np.float32(e_inv[1, 1]) * dy
    if p[_VACUUM] > 0.5:
        amplitude = np.ones_like(u0)
        r0, r1 = u0, u1
    else:
        g = p[_G].reshape(2, 2).astype(np.float32)
        g_inv = np.linalg.inv(p[_G].reshape(2, 2)).astype(np.float32)
        n0 = np.rint(g_inv[0, 0] * u0 + g_inv[0, 1] * u1)
        n1 = np.rint(g_inv[1, 0] * u0 + g_inv[1, 1] * u1)
        l0 = g[0, 0] * n0 + g[0, 1] * n1
        l1 = g[1, 0] * n0 + g[1, 1] * n1
        amplitude = np.exp((l0 * l0 + l1 * l1) * np.float32(-opts["falloff_inv2"]))
        amplitude[(n0 == 0) & (n1 == 0)] = opts["direct_beam"]
        r0, r1 = u0 - l0, u1 - l1
    z = (np.sqrt(r0 * r0 + r1 * r1) - np.float32(radius)) / np.float32(edge)
    # The profile's tail below 1e-6 (14 edge widths out) is cut to exact zeros, symmetrically
    # about each disk: the stores then compress 3-4x better and no centre moves.
    out = np.where(z < _CUT_EDGES, amplitude / (1.0 + np.exp(np.clip(z, -60.0, _CUT_EDGES))), 0.0)
    if opts["gradient"] and p[_VACUUM] < 0.5:  # no crystal, no dynamical gradient
        d0, d1 = (np.float32(v * opts["gradient"] / radius) for v in p[_DIRECTION])
        out *= np.clip(1.0 + r0 * d0 + r1 * d1, 0.0, None)
    return (out / out.sum(dtype=np.float64)).astype(np.float32)


def _render_block(params: np.ndarray, *, pattern: int, opts: dict[str, Any]) -> np.ndarray:
    """Patterns of shape (crx, cry, N, N) float32 for a block of parameters (crx, cry, P).

    Positions with identical parameters (a grain without descan) are rendered once.
    """
    rows = np.arange(pattern, dtype=np.float32)[:, None]
    cols = np.arange(pattern, dtype=np.float32)[None, :]
    out = np.empty(params.shape[:2] + (pattern, pattern), dtype=np.float32)
    done: dict[bytes, tuple[int, int]] = {}
    for i in range(params.shape[0]):
        for j in range(params.shape[1]):
            key = params[i, j].tobytes()
            if key in done:
                out[i, j] = out[done[key]]
            else:
                out[i, j] = _render_pattern(params[i, j], rows, cols, opts)
                done[key] = (i, j)
    return out


def simulate(config: SimulationConfig, *, chunks: tuple[int, int] | None = None) -> xr.Dataset:
    """A simulated scan, lazy, with its ground truth.

    Parameters
    ----------
    config
        What to simulate (see :class:`SimulationConfig`).
    chunks
        Probe positions (crx, cry) per dask chunk; by default the write block of
        :func:`stemlib.io.scan_store.choose_layout`, so that writing needs no rechunking. The
        values do not depend on it.

    Returns
    -------
    xarray.Dataset
        - ``data``: dask array of shape (RX, RY, QX, QY) float32, ``qx`` = pattern rows (axis 2),
          each pattern summing to 1 (unit "1": fraction of the pattern's intensity);
        - ``truth_exx, truth_eyy, truth_exy`` ("1", ``V - I`` in the detector frame),
          ``truth_theta`` (rad, from +qx towards +qy, wrapped by the symmetry), ``grain_id``
          (-1 in vacuum), ``reference_mask`` (the reference grain), ``origin_qx, origin_qy``
          (the direct beam of each position in px, with descan): numpy, dims (rx, ry); truth is
          NaN in vacuum;
        - attrs: ``origin_px`` (nominal direct beam ``(N // 2, N // 2)``), ``truth_symmetry``,
          ``reciprocal_basis_px`` (columns ``g1, g2`` of the reference lattice as (qx, qy) px),
          ``ellipse_matrix``, ``disk_radius_px``, ``simulation`` (the configuration).

    Raises
    ------
    InputError
        If the grains outnumber the probe positions, or the pattern cannot hold the lattice.

    Examples
    --------
    >>> ds = simulate(SimulationConfig(scan=(4, 4), pattern=32, grains=2))
    >>> ds["data"].shape, float(ds["data"][0, 0].sum().round(5))
    ((4, 4, 32, 32), 1.0)
    >>> int(ds["reference_mask"].sum()) > 0, ds.attrs["truth_symmetry"]
    (True, 4)
    """
    _check(config)
    truth = _draw_truth(config)
    rx, ry = config.scan
    n = config.pattern
    shape = (rx, ry, n, n)
    F = np.where(
        truth["vacuum"][..., None, None], np.nan, truth["F_grain"][truth["grain_of_position"]]
    )
    parts = strain_from_deformation(F, symmetry=config.symmetry)

    g_ref = config.reference_basis()
    g_local = np.swapaxes(np.linalg.inv(truth["F_grain"]), -1, -2) @ g_ref  # F^-T g per grain
    params = np.zeros((rx, ry, _PARAMS))
    params[..., _G] = g_local[truth["grain_of_position"]].reshape(rx, ry, 4)
    params[..., _ORIGIN] = truth["origin"]
    params[..., _DIRECTION] = truth["direction"]
    params[..., _VACUUM] = truth["vacuum"]
    if chunks is None:
        chunks = choose_layout(shape, np.float32).write_block[:2]  # type: ignore[assignment]
    block = (max(1, min(int(chunks[0]), rx)), max(1, min(int(chunks[1]), ry)))
    radius = config.resolved_disk_radius_px
    opts = {
        "e_inv": np.linalg.inv(config.ellipse_matrix()),
        "radius": radius,
        "edge": config.edge_px,
        "falloff_inv2": 1.0 / (config.falloff * config.resolved_spacing_px) ** 2,
        "direct_beam": config.direct_beam,
        "gradient": config.gradient,
    }
    lazy_params = da.from_array(
        params,
        chunks=block + (_PARAMS,),
        name="stemflow-simulate-params-" + tokenize(params, block),
    )
    data = lazy_params.map_blocks(
        _render_block,
        pattern=n,
        opts=opts,
        dtype=np.float32,
        drop_axis=2,
        new_axis=[2, 3],
        chunks=lazy_params.chunks[:2] + ((n,), (n,)),
        name="stemflow-simulate-" + tokenize(config.model_dump(mode="json"), block),
    )

    calibration = Calibration(origin_px=(float(n // 2), float(n // 2)))
    ds = truth_dataset(
        exx=parts["exx"],
        eyy=parts["eyy"],
        exy=parts["exy"],
        theta=parts["theta"],
        grain_id=truth["grain"],
        reference_mask=truth["reference"],
        symmetry=config.symmetry,
    )
    for axis, name in enumerate(("origin_qx", "origin_qy")):
        ds[name] = (
            SCAN_DIMS,
            truth["origin"][..., axis],
            {"units": "px", "long_name": f"direct-beam {name[-2:]} with descan"},
        )
    ds["data"] = (
        DIMS,
        data,
        {"units": "1", "long_name": "diffraction intensity (fraction of the pattern)"},
    )
    ds = ds.assign_coords(
        {
            name: (dim, values, a)
            for name, (dim, values, a) in scan_coords(shape, calibration).items()
        }
    )
    ds.attrs = {
        **calibration.to_attrs(),
        "source": f"simulated by stemlib.simulate (seed {config.seed})",
        "truth_symmetry": config.symmetry,
        "reciprocal_basis_px": g_ref.tolist(),
        "ellipse_matrix": config.ellipse_matrix().tolist(),
        "disk_radius_px": radius,
        "simulation": config.model_dump(mode="json"),
    }
    return ds


def simulation_recipe(config: SimulationConfig) -> dict[str, Any]:
    """What determines a simulated scan's values, the chunking aside (it changes no byte):
    :func:`stemlib.io.scan_store.finished_scan` finds a scan simulated from it."""
    return {
        "made_by": "stemlib.simulate",
        "simulation": config.model_dump(mode="json"),
        "software": software_versions(("stemflow",)),
    }


def write_simulation(
    config: SimulationConfig, dest: str, *, chunks: tuple[int, int] | None = None
) -> WriteResult:
    """Simulate and stream the scan, with its truth, into a scan store at ``dest``, atomically.

    Parameters
    ----------
    config
        What to simulate.
    dest
        Local path or fsspec URL of the store (a Zarr v3 group that ``xarray.open_zarr`` opens;
        :func:`stemlib.truth.open_truth` returns its truth).
    chunks
        Probe positions per rendering chunk (see :func:`simulate`).

    Returns
    -------
    WriteResult
        What was published (URL, shape, dtype, layout, ``content_sha256``, bytes), or what
        ``dest`` already held from the same configuration (status ``"skipped"``: nothing is
        simulated again).

    Raises
    ------
    InputError
        As :func:`simulate`; nothing is published.
    """
    recipe = simulation_recipe(config)
    done = finished_scan(dest, recipe)
    if done is not None:
        return done
    ds = simulate(config, chunks=chunks)
    extras = ds[[name for name, var in ds.data_vars.items() if var.dims == SCAN_DIMS]]
    attrs = {k: v for k, v in ds.attrs.items() if k not in Calibration.model_fields}
    attrs.update({"software": software_versions(), "created": utc_now()})
    return write_scan(
        ds["data"].data,
        dest,
        calibration=Calibration.from_attrs(ds.attrs),
        attrs=attrs,
        extras=extras,
        recipe=recipe,
    )
