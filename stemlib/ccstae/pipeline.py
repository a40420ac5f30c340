"""``ccstae_strain``: train on a scan (unsupervised), infer every pattern, and report strain.

Stages, each streaming the scan block by block:

1. statistics of a random sample of patterns (plus the reference region's): direct-beam
   radius (the ring's inner radius when the config gives no mask), intensity scale, and the
   noise model (Poisson likelihood for low-dose counts); a scan without Bragg disks to learn
   from is refused here (:mod:`stemlib.ccstae.survey`);
2. the rotation stage (:mod:`stemlib.ccstae.rotation`): each pattern's rotation over the full
   circle by polar correlation with a template built from the data;
3. the starting bases (:mod:`stemlib.ccstae.template`): sharp bases learned on the sample by
   alternating the two halves of the cycle loss, started from the reference region;
4. training of the network (:mod:`stemlib.ccstae.train`), resumed from ``workdir``;
5. inference: the network's class and warp of every pattern, refined against its base
   (:mod:`stemlib.ccstae.infer`, :mod:`stemlib.ccstae.refine`);
6. strain against the reference region with the rotation folded by the lattice symmetry
   (:mod:`stemlib.ccstae.strain`), detected from the learned base when ``symmetry="auto"``.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from scipy import ndimage

from ..calibration import Calibration
from ..errors import InputError
from ..io.scan_store import scan_label
from ..io.storage import WORK_PREFIX, staged_file, temporary_folder
from ..masks import MaskSchedule, ring_mask
from ..progress import Counter, Progress, Report, reporter
from ..provenance import input_provenance
from ..py4dstem.pipeline import region_lattice
from ..reference import (
    ReferenceLike,
    auto_reference,
    describe_reference,
    reference_name,
    reference_warnings,
)
from ..results import strain_dataset
from ..scan import ScanLike, as_scan
from ..strain import detect_symmetry, fold_rotation, rotation_matrix
from ..types import SCAN_DIMS, Device, Symmetry
from .config import CCSTAEConfig, check_config, resolve_device
from .data import PatternStream, Preprocess, as_dask, data_fingerprint, sample_patterns
from .figures import save_bases_png
from .infer import Inference, infer
from .memory import batch_that_fits, gpu_memory_explained, search_block, template_block
from .model import build_model
from .rotation import (
    angular_symmetry,
    build_template,
    centred_features,
    correlate_angles,
    polar_features,
)
from .strain import strain_from_warps
from .survey import (
    beam_tail,
    check_positions,
    disk_window,
    origin_warnings,
    survey,
)
from .template import BLOCK, learn_bases
from .train import Checkpoint, seeded, train

log = logging.getLogger("stemlib.ccstae")

__all__ = ["ccstae_strain", "train_on_scan", "base_lattice"]


def base_lattice(
    base: np.ndarray, *, center: tuple[float, float], inner: float, window: int = 2
) -> np.ndarray | None:
    """Reciprocal basis (columns g1, g2, (qx, qy) px) of the disks of a learned base (H, W).

    Local maxima beyond ``inner`` px brighter than a quarter of the brightest one, refined by
    their centre of mass over ``2 window + 1`` px; ``g1`` the shortest, ``g2`` the shortest at
    more than 30 deg from it. None if fewer than two such disks.
    """
    smooth = ndimage.gaussian_filter(np.asarray(base, np.float64), 1.0)
    rows, cols = np.indices(smooth.shape)
    r = np.hypot(rows - center[0], cols - center[1])
    peaks = (
        (smooth == ndimage.maximum_filter(smooth, size=2 * window + 1))
        & (r > inner)
        & (r < min(smooth.shape) / 2 - window)
    )
    if peaks.sum() < 2:
        return None
    values = smooth[peaks]
    keep = values > 0.25 * values.max()
    if keep.sum() < 2:  # e.g. a vacuum base: noise peaks, none of them brighter than the rest
        return None
    pr, pc = rows[peaks][keep], cols[peaks][keep]
    vectors = []
    for i, j in zip(pr, pc, strict=True):
        i0, j0 = max(i - window, 0), max(j - window, 0)
        win = smooth[i0 : i + window + 1, j0 : j + window + 1]
        wr, wc = np.indices(win.shape)
        wgt = win - win.min()
        total = wgt.sum() or 1.0
        vectors.append(
            ((wgt * wr).sum() / total + i0 - center[0], (wgt * wc).sum() / total + j0 - center[1])
        )
    vectors = np.array(vectors)
    order = np.argsort(np.linalg.norm(vectors, axis=1))
    g1 = vectors[order[0]]
    for k in order[1:]:
        g2 = vectors[k]
        cross = abs(g1[0] * g2[1] - g1[1] * g2[0])
        if cross > 0.5 * np.linalg.norm(g1) * np.linalg.norm(g2):
            return _fit_basis(vectors, np.stack([g1, g2], axis=1))
    return None


def _fit_basis(vectors: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Least-squares basis (2, 2) of all disk vectors (N, 2) that index within a quarter of an
    order on ``basis``: far disks pin the basis far better than the two nearest alone."""
    hk = np.linalg.solve(basis, vectors.T).T
    index = np.round(hk)
    keep = (np.abs(hk - index).max(axis=1) < 0.25) & (np.abs(index).sum(axis=1) > 0)
    if keep.sum() < 3:
        return basis
    fitted, *_ = np.linalg.lstsq(index[keep], vectors[keep], rcond=None)
    return fitted.T


def _base_symmetry(
    base: np.ndarray, *, center: tuple[float, float], radii: tuple[float, float], beam: float
) -> tuple[int, int | None]:
    """The lattice symmetry of a learned base, and the one its disks' basis gives alone.

    The strongest angular order of its ring (:func:`stemlib.ccstae.rotation.angular_symmetry`)
    is robust to noise and to disk intensities; it cannot tell a rectangular lattice from a
    square one, which the lengths of the disks' reciprocal basis do
    (:func:`stemlib.strain.detect_symmetry`): a 4-fold ring whose two basis vectors differ in
    length by more than 10 % is a 2-fold lattice.
    """
    x = torch.from_numpy(np.asarray(base, np.float32))[None, None]
    harmonic = angular_symmetry(polar_features(x, center=center, radii=radii, n_angles=720)[0])
    lattice = base_lattice(base, center=center, inner=radii[0], window=disk_window(beam))
    if lattice is None:
        return harmonic, None
    lengths = np.linalg.norm(lattice, axis=0)
    if harmonic == 4 and abs(lengths.max() / lengths.min() - 1) > 0.1:
        harmonic = 2
    return harmonic, int(detect_symmetry(lattice))


def _some(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``indices``, drawn without replacement."""
    if len(indices) <= n:
        return indices
    return np.random.default_rng(seed).choice(indices, size=n, replace=False)


def _report_epoch(metrics: dict[str, Any], *, epochs: int, to: Report) -> None:
    to(
        f"ccstae: epoch {metrics['epoch']}/{epochs}  loss {metrics['loss']:.5g}  "
        f"{metrics['patterns_per_s']:.0f} patterns/s"
        f"  ({metrics['seconds']:.1f} s, {metrics['skipped_batches']} skipped)"
    )


def _rotation_stage(
    data: Any,
    preprocess: Preprocess,
    *,
    config: CCSTAEConfig,
    center: tuple[float, float],
    radii: tuple[float, float],
    device: torch.device,
    sample: np.ndarray,
    pick: np.ndarray,
    start: np.ndarray | None,
    poisson: bool,
    beam: float,
    report: Report | None,
) -> dict[str, np.ndarray]:
    """Each position's direct beam (descan) and rotation (rad), the correlation peak, the
    template's angular symmetry and the starting bases learned on the sample (``sample``: its
    patterns, preprocessed; ``pick``: their flat scan indices; ``start``: its patterns of the
    reference, or None: of the largest grain of one rotation, :func:`_grain_of_one_turn`);
    ``report`` takes the progress over the scan's patterns."""
    h, w = data.shape[2:]
    search_radius = beam + 0.08 * min(h, w)  # the beam plus up to 8 % of the pattern of descan
    x = torch.from_numpy(sample)[:, None].to(device)
    # The most patterns a block can hold: the sample, or one stored chunk of the scan.
    most = min(config.infer_batch_size, max(len(x), int(np.prod(data.chunksize[:2]))))
    block, smaller = search_block(
        (h, w), radii=radii, n_angles=config.search_angles, requested=most, device=device
    )
    if smaller and report:
        report(smaller)
    search = partial(
        centred_features,
        center=center,
        radius=search_radius,
        radii=radii,
        n_angles=config.search_angles,
        block=block,
    )
    beams, features = search(x)
    template = build_template(features)
    sample_theta, _ = correlate_angles(features, template)
    ring = torch.from_numpy(
        ring_mask(x.shape[-2:], inner=radii[0], outer=radii[1], center=center)
    ).to(x)
    rx, ry = data.shape[:2]
    theta = np.zeros(rx * ry, np.float32)
    peak = np.zeros(rx * ry, np.float32)
    shift = np.zeros((rx * ry, 2), np.float32)
    stream = PatternStream(data, preprocess, batch_size=block)
    counter = Counter(report, "ccstae: rotation search", rx * ry)
    for batch in stream:
        found, f = search(batch["pattern"].to(device))
        t, p = correlate_angles(f, template)
        idx = batch["index"].numpy()
        theta[idx], peak[idx] = t.cpu().numpy(), p.cpu().numpy()
        shift[idx] = (found - found.new_tensor(center)).cpu().numpy()
        counter.add(len(idx))
    symmetry = angular_symmetry(template.cpu())
    if start is None:
        start = _grain_of_one_turn(theta.reshape(rx, ry), symmetry).reshape(-1)[pick]
    bases_block, smaller = template_block((h, w), requested=min(BLOCK, len(x)), device=device)
    if smaller and report:
        report(smaller)
    learned = learn_bases(
        x,
        sample_theta,
        ring,
        num_bases=config.num_bases,
        center=center,
        seed=config.seed,
        rounds=config.template_rounds,
        steps=config.template_steps,
        poisson=poisson,
        background=config.background,
        start=torch.from_numpy(start),
        shift=beams - beams.new_tensor(center),
        disk_radius=beam if config.rigid_disks else None,
        inner=radii[0],
        batch_size=bases_block,
        report=report,
    )
    return {
        "theta0": theta.reshape(rx, ry),
        "shift0": shift.reshape(rx, ry, 2),
        "peak": peak.reshape(rx, ry),
        "angular_symmetry": np.array(symmetry),
        "initial_bases": learned["bases"].cpu().numpy(),
    }


def _read_rotation(path: Path) -> dict[str, np.ndarray] | None:
    """The rotation stage's saved result, or None where there is none that reads whole (the
    stage then runs again: it is a cache of the sample and the scan)."""
    try:
        with np.load(path) as saved:
            return {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _save_arrays(path: Path, arrays: dict[str, np.ndarray] | np.ndarray) -> None:
    """Save arrays by name (``.npz``, the rotation stage's result for :func:`_read_rotation`) or
    one array (``.npy``) whole or not at all (:func:`stemlib.io.storage.staged_file`): a run
    killed while writing, or a full disk, leaves no stub that a rerun would take for a
    result."""
    # In memory first (a few MB): given a file name, NumPy appends ".npz" to it; given a file
    # that fails part way, it leaves its zip archive open, to be closed after the file.
    buffer = io.BytesIO()
    if isinstance(arrays, dict):
        np.savez(buffer, **arrays)
    else:
        np.save(buffer, arrays)
    with staged_file(path) as temp:
        temp.write_bytes(buffer.getbuffer())


def _grain_of_one_turn(theta: np.ndarray, symmetry: int) -> np.ndarray:
    """The largest connected region of one rotation (:func:`stemlib.reference.auto_reference`
    on the angles folded by the lattice's ``symmetry``), (RX, RY) bool; all False if none.

    Where the reference is left to be found after inference, the starting base begins here
    rather than at the densest spot of the sample: the reference is normally the largest grain,
    and a base taken from another grain is that grain's strained lattice, whose distortion ``B``
    is then measured to a few 1e-4, and that error, unlike the lattice's, does not cancel between
    branches. On the demo the densest spot was a strained grain (its 65 patterns all from the
    grain of 171; the reference's 511 lie on four branches): every strained grain came out
    +0.2e-3 in exx or eyy and -0.012 to -0.020 deg off. Started from the reference grain, theta's
    error fell from 0.0119 to 0.0101 deg.
    """
    try:
        return auto_reference(rotation_matrix(fold_rotation(theta, symmetry)), np.isfinite(theta))
    except InputError:
        return np.zeros(theta.shape, bool)


def _valid_positions(result: Inference, bases: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Positions with an answer: finite warp, a crystalline base, and disks actually present.

    A class whose base's brightest disk in ``mask`` (the ring beyond the direct beam's tail)
    rises above the ring's median by less than 10 % of the strongest base's has no answer
    (vacuum: a clean vacuum base is the beam alone, which its patterns fit as well as crystal
    patterns fit theirs, so the fit's gain cannot tell); a pattern whose fitted gain is below a
    quarter of the median gain shows no disks of its base.
    """
    finite = np.all(np.isfinite(result.matrix), axis=(-1, -2))
    smooth = [ndimage.gaussian_filter(np.asarray(b, np.float64), 1.0)[mask] for b in bases]
    contrast = np.array([v.max() - np.median(v) for v in smooth])
    crystalline = contrast >= 0.1 * contrast.max()
    ok = finite & crystalline[np.clip(result.class_map, 0, len(bases) - 1)]
    gain = np.where(ok, result.gain, np.nan)
    if np.isfinite(gain).any():
        ok &= result.gain > 0.25 * np.nanmedian(gain)
    return ok


@dataclass
class _Trained:
    """Everything the training stages leave for inference."""

    device: torch.device
    config: CCSTAEConfig
    data: Any
    center: tuple[float, float]
    reference_mask: np.ndarray | None
    reference_name: str
    fingerprint: str
    setup: dict[str, Any]
    schedule: MaskSchedule
    preprocess: Preprocess
    search: dict[str, np.ndarray]
    model: Any
    record: Checkpoint
    checkpoint_sha256: str
    timings: dict[str, float]


def _train_stages(
    scan: Any,
    *,
    reference: ReferenceLike,
    config: CCSTAEConfig | None,
    device: Device | torch.device,
    folder: Path,
    progress: Progress,
) -> _Trained:
    """Statistics, rotation stage, starting bases and training, resumed from ``folder``."""
    from ..reference import parse_reference

    report = reporter(progress)
    dev = resolve_device(device)
    config = config or CCSTAEConfig.for_device(dev)
    data = as_dask(scan)
    rx, ry, h, w = (int(n) for n in data.shape)
    check_config(config, pattern_shape=(h, w))
    check_positions(scan)
    reference_mask = parse_reference(reference, (rx, ry))
    named = reference_name(reference)  # a mask in memory is hashed: once
    timings: dict[str, float] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot make the work folder {folder} ({exc.strerror}); give a workdir that is a "
            "folder you can write to."
        ) from None
    fingerprint = data_fingerprint(scan)
    record = Checkpoint.load(folder)
    if record is not None:
        record.check_matches(config=config, data_fingerprint=fingerprint, where=str(folder))

    start = time.perf_counter()
    include = (
        None if reference_mask is None else _some(np.flatnonzero(reference_mask), 256, config.seed)
    )
    sample = pick = None
    if record is None:
        sample, pick = sample_patterns(
            data, n=config.search_patterns, seed=config.seed, include=include
        )
        setup, schedule = survey(scan, sample, config=config)
        setup["reference"] = named
    else:
        setup = record.setup
        if setup.get("reference") != named:
            raise InputError(
                f"{folder} holds a checkpoint whose bases started from reference "
                f"{setup.get('reference')!r}, "
                f"not {named!r}; pass that reference or an empty workdir."
            )
        schedule = MaskSchedule.model_validate(setup["mask"])
    center = (float(setup["center"][0]), float(setup["center"][1]))
    poisson = setup["noise_model"] == "poisson"
    preprocess = Preprocess("linear" if poisson else config.intensity, setup["intensity_scale"])
    timings["statistics_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rotation_file = folder / "rotation.npz"
    search = _read_rotation(rotation_file) if record is not None else None
    if search is None:
        if sample is None:
            sample, pick = sample_patterns(
                data, n=config.search_patterns, seed=config.seed, include=include
            )
        sample = preprocess(sample)  # not beside the raw copy: 0.5 GB each at 256 px
        with gpu_memory_explained(
            "rotation search", setting="infer_batch_size", value=config.infer_batch_size, device=dev
        ):
            search = _rotation_stage(
                data,
                preprocess,
                config=config,
                center=center,
                radii=schedule.radii(0),
                device=dev,
                sample=sample,
                pick=pick,
                start=None if include is None else np.isin(pick, include),
                poisson=poisson,
                beam=setup["beam_radius_px"],
                report=report,
            )
        _save_arrays(rotation_file, search)
    del sample
    timings["rotation_search_s"] = time.perf_counter() - start

    seeded(config.seed)
    model = build_model(config, pattern_shape=(h, w), center=center).to(dev)
    if record is None or not record.model:
        model.initialise_bases(torch.from_numpy(search["initial_bases"]))
    if record is None:
        record = Checkpoint(
            config=config.model_dump(mode="json"),
            seed=config.seed,
            data_fingerprint=fingerprint,
            setup=setup,
        )
    stream = PatternStream(
        data,
        preprocess,
        batch_size=config.batch_size,
        shuffle=True,
        seed=config.seed,
        theta0=search["theta0"],
        shift0=search["shift0"],
    )
    slice_size, sliced = batch_that_fits(
        model, (h, w), requested=config.batch_size, device=dev, training=True
    )
    if sliced and report and record.epoch < config.epochs:
        report(sliced)
    start = time.perf_counter()
    with gpu_memory_explained("training", setting="batch_size", value=slice_size, device=dev):
        record = train(
            model,
            stream,
            config=config,
            schedule=schedule,
            device=dev,
            record=record,
            workdir=folder,
            progress=partial(_report_epoch, epochs=config.epochs, to=report) if report else None,
            slice_size=slice_size,
        )
    timings["training_s"] = time.perf_counter() - start
    if config.epochs == 0:
        record.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        record.save(folder)
    return _Trained(
        device=dev,
        config=config,
        data=data,
        center=center,
        reference_mask=reference_mask,
        reference_name=named,
        fingerprint=fingerprint,
        setup=setup,
        schedule=schedule,
        preprocess=preprocess,
        search=search,
        model=model,
        record=record,
        checkpoint_sha256=record.file_sha256(folder),
        timings=timings,
    )


def train_on_scan(
    scan: ScanLike,
    *,
    workdir: str,
    reference: ReferenceLike = "auto",
    config: CCSTAEConfig | None = None,
    device: Device | torch.device = "auto",
    progress: Progress = True,
) -> dict[str, Any]:
    """Train the CC-ST-AE on a scan and leave the checkpoint in ``workdir`` (resumed if there).

    The training half of :func:`ccstae_strain`; a later ``ccstae_strain`` with the same
    ``workdir``, scan, reference and config only infers.

    Parameters
    ----------
    scan, reference, config, device, progress
        As :func:`ccstae_strain`.
    workdir
        Local folder of the checkpoint: created if missing; a checkpoint there of the same scan,
        reference and training settings is resumed (or taken as trained).

    Returns
    -------
    dict
        ``workdir``, ``epochs``, ``final_loss`` (None after no epoch), ``epoch_s`` (seconds of
        each epoch, resumed ones included: on CUDA the first holds ``torch.compile``'s
        compilation), ``checkpoint_sha256``, ``timings_s`` (seconds per stage).

    Raises
    ------
    InputError
        As :func:`ccstae_strain` does for the scan, reference, device and config, and for a
        ``workdir`` holding another run's checkpoint.
    """
    trained = _train_stages(
        as_scan(scan),
        reference=reference,
        config=config,
        device=device,
        folder=Path(workdir),
        progress=progress,
    )
    history = trained.record.history
    return {
        "workdir": str(workdir),
        "epochs": trained.record.epoch,
        "final_loss": history[-1]["loss"] if history else None,
        "epoch_s": [float(h["seconds"]) for h in history],
        "checkpoint_sha256": trained.checkpoint_sha256,
        "timings_s": trained.timings,
    }


def ccstae_strain(
    scan: ScanLike,
    *,
    reference: ReferenceLike = "auto",
    symmetry: Symmetry = "auto",
    config: CCSTAEConfig | None = None,
    device: Device | torch.device = "auto",
    workdir: str | None = None,
    bases_png: str | None = None,
    progress: Progress = True,
) -> xr.Dataset:
    """Strain, shear and rotation maps of a scan by the CC-ST-AE (method ``"ccstae"``).

    The model trains on the scan itself (unsupervised), then infers every pattern's class and
    affine warp onto its learned base; the warps give the deformation against the reference
    region (see :mod:`stemlib.ccstae.strain` for the geometry).

    Parameters
    ----------
    scan
        Lazy DataArray of shape (RX, RY, QX, QY) (``qx`` = pattern rows, axis 2), as
        :func:`stemlib.io.open_scan` returns, or a NumPy or dask array of that shape or a
        DataArray of those dims without attributes (:func:`stemlib.scan.as_scan`);
        The masks centre on the direct beam measured in a sample of its patterns (where it
        lies within 1 px of ``attrs["origin_px"]``, or without one of ``(QX // 2, QY // 2)``,
        on that): a recorded beam outside the measured one is a warning.
    reference
        ``"auto"`` (the largest region of consistent lattice), ``"RX0:RX1,RY0:RY1"``, or a
        boolean mask of shape (RX, RY), in memory or the path of a ``.npy`` file
        (:func:`stemlib.reference.parse_reference`).
        The starting bases are learned from the reference region's patterns.
    symmetry
        The lattice's n-fold symmetry for the rotation branch; ``"auto"`` detects it from the
        learned base (angular harmonics of its ring, cross-checked with
        :func:`stemlib.strain.detect_symmetry` of its disks).
    config
        The recipe; the ``"gpu"`` preset on CUDA, else ``"cpu"``.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``, or a ``torch.device`` (``cuda:1`` for a host's
        second GPU).
    workdir
        Folder for the checkpoint, the rotation stage's result and the bases; a rerun with the
        same scan, reference and config resumes from it (and only infers once trained). None: a
        temporary folder under ``TMPDIR``, removed afterwards, or by the next run if this one
        is killed (:func:`stemlib.io.storage.temporary_folder`).
    bases_png
        Where to save a picture of the learned bases (path or URL), if given.
    progress
        One line per epoch (loss, patterns/s), and per quarter of the scan in the stages that
        pass over every pattern (:mod:`stemlib.progress`): True prints them on stderr,
        a function (such as a logger's ``info``) receives them, False says nothing.

    Returns
    -------
    xarray.Dataset
        :func:`stemlib.results.strain_dataset` with method ``"ccstae"``: ``exx, eyy, exy``
        ("1", detector frame), ``theta`` (rad), ``valid``, plus ``class_map`` (index of the
        base), ``reconstruction_error`` (masked MSE, preprocessed units) and
        ``reference_region``. ``attrs["methods"]["ccstae"]`` records the config, symmetry,
        training history, timings and the checkpoint's SHA-256.

    Raises
    ------
    InputError
        A scan that is not 4-dimensional (rx, ry, qx, qy); bad device, symmetry or config for
        this scan, a reference region outside the scan or
        without a valid answer, a scan whose sampled patterns show no Bragg disks
        (:func:`stemlib.angular.angular_order`), or a ``workdir`` holding another run's
        checkpoint.

    References
    ----------
    Qin, Tran, Agar, "Extremely Noisy 4D-TEM Strain Mapping Using Cycle Consistent Spatial
    Transforming Autoencoders", NeurIPS 2023 ML4PS workshop.

    Examples
    --------
    A simulated scan's patterns as a NumPy array (its grain 1 is turned by -0.742 rad), mapped by
    a small network trained for two epochs; a real scan wants the full preset:

    >>> from stemlib.metrics import strain_errors
    >>> from stemlib.simulate import SimulationConfig, simulate
    >>> sim = simulate(SimulationConfig(scan=(8, 8), pattern=64, grains=2, seed=1))
    >>> quick = CCSTAEConfig.preset("cpu", epochs=2, channels=8, search_angles=180)
    >>> ds = ccstae_strain(
    ...     sim["data"].values, reference="0:8,4:8", config=quick, device="cpu", progress=False
    ... )
    >>> ds["exx"].dims, ds["exx"].attrs["units"], ds["theta"].attrs["units"]
    (('method', 'rx', 'ry'), '1', 'rad')
    >>> round(float(ds["theta"].sel({"method": "ccstae"})[0, 0]), 3)
    -0.742
    >>> errors = strain_errors(ds.sel({"method": "ccstae"}), sim)  # against the truth
    >>> all(errors[c] < 1e-4 for c in ("exx", "eyy", "exy")), errors["coverage"]
    (True, 1.0)
    """
    if symmetry not in ("auto", 2, 4, 6):
        raise InputError(f"symmetry={symmetry!r} is not known; use auto, 2, 4 or 6.")
    scan = as_scan(scan)
    with ExitStack() as stack:
        folder = (
            Path(workdir) if workdir else Path(stack.enter_context(temporary_folder(WORK_PREFIX)))
        )
        t = _train_stages(
            scan,
            reference=reference,
            config=config,
            device=device,
            folder=folder,
            progress=progress,
        )
        config, schedule, setup = t.config, t.schedule, t.setup
        start = time.perf_counter()
        h, w = setup["pattern_shape"]
        last_mask = torch.from_numpy(schedule.mask((h, w), config.last_epoch)).float()
        report = reporter(progress)
        batch, smaller = batch_that_fits(
            t.model, (h, w), requested=config.infer_batch_size, device=t.device
        )
        if smaller and report:
            report(smaller)
        with gpu_memory_explained(
            "inference", setting="infer_batch_size", value=batch, device=t.device
        ):
            result = infer(
                t.model,
                PatternStream(
                    t.data,
                    t.preprocess,
                    batch_size=batch,
                    theta0=t.search["theta0"],
                    shift0=t.search["shift0"],
                ),
                mask=last_mask,
                device=t.device,
                refine_steps=config.refine_steps,
                poisson=setup["noise_model"] == "poisson",
                background=config.background,
                disk_gains=config.disk_gains,
                rigid_disks=config.rigid_disks,
                neighbour_starts=config.neighbour_starts,
                inner=schedule.radii(0)[0],
                disk_radius=setup["beam_radius_px"],
                num_workers=config.num_workers,
                amp=config.amp,
                report=report,
            )
        t.timings["inference_s"] = time.perf_counter() - start
        with torch.no_grad():
            bases = t.model.bases()[:, 0].float().cpu().numpy()
        _save_arrays(folder / "bases.npy", bases)

    ring_last = last_mask.numpy() > 0.5
    rows, cols = np.indices(ring_last.shape)
    beam = setup["beam_radius_px"]
    beyond = np.hypot(rows - t.center[0], cols - t.center[1]) > beam_tail(schedule, beam)
    valid = _valid_positions(result, bases, ring_last & beyond)
    main_class = (
        int(np.bincount(result.class_map[valid], minlength=len(bases)).argmax())
        if valid.any()
        else 0
    )
    detected, lattice_symmetry = _base_symmetry(
        bases[main_class], center=t.center, radii=schedule.radii(0), beam=beam
    )
    n = detected if symmetry == "auto" else int(symmetry)
    lattices = [
        base_lattice(b, center=t.center, inner=schedule.radii(0)[0], window=disk_window(beam))
        for b in bases
    ]
    classes = np.clip(result.class_map, 0, len(bases) - 1)
    where = scan_label(scan)
    strain, reference_mask, ellipse = strain_from_warps(
        result.matrix,
        classes,
        valid,
        lattices,
        symmetry=n,
        reference=t.reference_mask,
        measure=lambda region: region_lattice(t.data, region, where=where),
        ellipse=config.ellipse,
    )
    if bases_png is not None:
        save_bases_png(bases, bases_png, mask=ring_last)
    coords = {d: scan.coords[d] for d in SCAN_DIMS if d in scan.coords}
    described = describe_reference(t.reference_name, reference_mask)
    warnings = origin_warnings(scan, setup) + reference_warnings(strain, valid, reference=described)
    return strain_dataset(
        "ccstae",
        **strain,
        valid=valid,
        coords=coords or None,
        calibration=Calibration.from_attrs(scan.attrs),
        extras={
            "class_map": (
                result.class_map.astype(np.int32),
                {"units": "1", "long_name": "index of the learned base"},
            ),
            "reconstruction_error": (
                result.error,
                {
                    "units": "1",
                    "long_name": "masked mean squared difference between pattern and warped base",
                },
            ),
            "reference_region": (reference_mask, {"units": "1", "long_name": "reference region"}),
        },
        attrs={
            "reference": described,
            **input_provenance(scan),
            "model_checkpoint_sha256": t.checkpoint_sha256,
        },
        method_attrs={
            "reference": described,
            "config": config.model_dump(mode="json"),
            "symmetry": n,
            "symmetry_detected": detected,
            "symmetry_from_base_lattice": lattice_symmetry,
            "detector_ellipse": ellipse,
            "device": str(t.device),
            "setup": setup,
            "training": t.record.history,
            "timings_s": t.timings,
            "inference_batch": batch,
            "rotation_search_peak_median": float(np.median(t.search["peak"])),
            "model_checkpoint_sha256": t.checkpoint_sha256,
            "warnings": warnings,
        },
    )
