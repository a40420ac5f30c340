"""# Noise sweep: the accuracy benchmark as a flow

How much noise can each method take? This flow repeats the CC-ST-AE paper's benchmark (Qin,
Tran, Agar 2023, Figure 3) on one simulated scan and prints our errors beside the paper's:

1. **Simulate** one scan of Voronoi grains with its ground truth, and one noisy copy per
   background level w of the paper's model (the `simulate-benchmark` flow's tasks and store
   names: `sim.zarr`, `sim-noise05.zarr`, ...; w = 0 is the clean scan itself). A store that
   already holds the same simulation or copy is kept.
2. **Map strain** on every level with CC-ST-AE and py4DSTEM, all in parallel on the Dask
   cluster, against the same reference region: by default the truth's unstrained reference
   grain, so that both methods are scored the same way. Each result goes to the work folder
   beside `dest` with a fingerprint of its scan and parameters; a rerun skips finished levels.
3. **Score** each map against the truth (mean absolute error over every position), beside the
   least error that each level's counts allow any unbiased per-pattern method (the
   Cramér-Rao bound of `stemlib.bounds`, from the clean patterns), and publish the table: a
   Markdown artifact, and `sim-sweep.md` / `sim-sweep.json` beside `dest`.

A method that refuses a level (e.g. py4DSTEM finding no disks in 90 % background) gives an
empty row for that level, not a failed sweep.

    stemflow sweep out/sim.zarr --levels 0,0.25,0.5 --scan 32 --pattern 128
    python -m flows.noise_sweep out/sim.zarr
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import sys
from typing import Any, Literal

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from stemlib.baseline_py4dstem import Py4DSTEMConfig
from stemlib.ccstae import CCSTAEConfig
from stemlib.errors import InputError, StemflowError
from stemlib.io.scan_store import finished_scan, read_store_attrs
from stemlib.io.storage import Location, locate, redact, storage_errors, work_folder
from stemlib.jsonvalues import json_values
from stemlib.noise import noise_recipe
from stemlib.paper import PAPER_COMPONENTS, paper_mae, paper_percent, paper_ratio
from stemlib.provenance import software_versions, utc_now
from stemlib.reference import parse_reference
from stemlib.rerun import finished_step, run_key, scan_identity
from stemlib.simulate import SimulationConfig, simulation_recipe
from stemlib.truth import open_truth
from stemlib.types import Device, Method
from tasks.ccstae import gpu_resources, infer_ccstae, train_ccstae
from tasks.py4dstem import py4dstem_strain_scan
from tasks.score import least_errors_scan, score_strain
from tasks.simulate import noise_scan, simulate_scan

from .process_scan import resolved_parameters
from .runners import dask_runner
from .simulate_benchmark import NoiseLevels, noisy_url

__all__ = ["SWEEP_SIMULATION", "check_sweep", "noise_sweep", "sweep_table", "table_url"]

#: The paper's protocol at a size a CPU sweeps in minutes: 32 x 32 positions of 128 x 128 px,
#: 8 square grains, strain and shear in +-2 %, rotations over the full circle.
SWEEP_SIMULATION = SimulationConfig(
    scan=(32, 32), pattern=128, grains=8, max_strain=0.02, max_rot_deg=180.0
)
_NAMES = {"py4dstem": "py4DSTEM", "ccstae": "CC-ST-AE"}


def table_url(dest: str, suffix: str) -> str:
    """The table file beside the clean scan ``dest``: ``sim.zarr`` -> ``sim-sweep.md``.

    Examples
    --------
    >>> table_url("s3://bucket/runs/sim.zarr", "json")
    's3://bucket/runs/sim-sweep.json'
    """
    where = locate(dest)
    stem = where.name[: -len(".zarr")] if where.name.endswith(".zarr") else where.name
    return where.sibling(f"{stem}-sweep.{suffix}").url


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """The sweep's rows (as :func:`noise_sweep` returns them) as a Markdown table.

    One line per background level: MAE of each component (1e-3 for strain, deg for theta) as
    "py4DSTEM / CC-ST-AE", the paper's figures in parentheses where it has the level, the
    ratio CC-ST-AE / py4DSTEM beside the paper's, each method's coverage, and the least MAE
    of exx/eyy/exy (1e-3) the counts allow; "-" where a method was not run or gave no answer.
    """
    head = (
        "| background | exx (1e-3) | eyy (1e-3) | exy (1e-3) | theta (deg) | ratio exx/eyy/exy "
        "| paper ratio | coverage | least possible exx/eyy/exy (1e-3) |"
    )
    lines = [
        "MAE against the truth, py4DSTEM / CC-ST-AE (the paper's Figure 3 in parentheses); "
        "ratio = CC-ST-AE / py4DSTEM; least possible = the Cramér-Rao bound of any unbiased "
        "method fitting one pattern at a time (none for the clean scan).",
        "",
        head,
        "|" + "---|" * 9,
    ]
    for row in rows:
        p4, cc = (row["methods"].get(m, {}) for m in ("py4dstem", "ccstae"))
        paper = row["paper"]
        cells = [f"{row['level'] * 100:g} %"]
        for c in PAPER_COMPONENTS:
            cells.append(_pair(p4.get(c), cc.get(c), 1e3))
            if paper:
                cells[-1] += (
                    f" ({_pair(paper['mae']['py4dstem'][c], paper['mae']['ccstae'][c], 1e3, 1)})"
                )
        cells.append(_pair(p4.get("theta"), cc.get("theta"), 180 / math.pi, 3))
        cells.append("/".join(_number((row["ratio"] or {}).get(c)) for c in PAPER_COMPONENTS))
        cells.append(
            "/".join(_number(paper["ratio"][c]) for c in PAPER_COMPONENTS) if paper else "-"
        )
        cells.append(_pair(p4.get("coverage"), cc.get("coverage"), 1, 3))
        least = row.get("least") or {}
        cells.append("/".join(_number(least.get(c), 1e3) for c in PAPER_COMPONENTS))
        lines.append(f"| {' | '.join(cells)} |")
    notes = [
        f"- {row['level'] * 100:g} %, {_NAMES[m]}: {r['error']}"
        for row in rows
        for m, r in row["methods"].items()
        if r.get("error")
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def _number(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * scale:.{digits}f}"


def _pair(a: float | None, b: float | None, scale: float, digits: int = 2) -> str:
    return f"{_number(a, scale, digits)} / {_number(b, scale, digits)}"


def _run_name() -> str:
    dest = str(flow_run.parameters.get("dest", "sim"))
    return f"sweep-{posixpath.basename(dest.rstrip('/')) or 'sim'}"


@flow(name="noise-sweep", flow_run_name=_run_name, task_runner=dask_runner(), log_prints=True)
def noise_sweep(
    dest: str,
    simulation: SimulationConfig = SWEEP_SIMULATION,
    noise: NoiseLevels | None = None,
    methods: list[Method] | None = None,
    reference: str = "truth",
    device: Device = "auto",
    ccstae_preset: Literal["auto", "cpu", "gpu"] = "auto",
    ccstae: CCSTAEConfig | None = None,
    py4dstem: Py4DSTEMConfig | None = None,
    workdir: str | None = None,
) -> list[dict[str, Any]]:
    """Both methods' errors against the truth at each background level of the paper's noise.

    Args:
        dest: Store for the clean simulated scan, a path or URL ending in .zarr; the noisy
            copies and the table (sim-sweep.md, sim-sweep.json) go beside it.
        simulation: Scan and pattern size, grains, lattice, strain and rotation ranges, seed.
        noise: Background levels w (default the paper's 0-70 %), dose and seed of the copies.
        methods: Methods to run; both by default.
        reference: Reference region: "truth" (the simulated reference grain, the default),
            "auto", "RX0:RX1,RY0:RY1", or the path of a mask .npy.
        device: Where the CC-ST-AE trains: "auto" (CUDA when present), "cpu" or "cuda".
        ccstae_preset: CC-ST-AE recipe: "auto" (gpu on CUDA, else cpu), "cpu" or "gpu".
        ccstae: A full CC-ST-AE configuration, replacing the preset.
        py4dstem: py4DSTEM baseline settings (all derived from the data by default).
        workdir: Folder for the strain maps and checkpoints; beside dest by default.

    Returns:
        One row per level: ``level`` (w), ``scan`` (its store), ``methods`` (per method its
        ``status``, ``url`` and MAE ``exx, eyy, exy`` ("1"), ``theta`` (rad), ``coverage``, or
        ``error``), ``ratio`` (CC-ST-AE / py4DSTEM per strain component), ``paper`` (the
        paper's MAE and ratio at this level, or None) and ``least`` (the least MAE that the
        level's counts allow, keyed as the methods' MAE, None where they allow no answer; None
        for the clean scan).
    """
    logger = get_run_logger()
    noise = noise or NoiseLevels()
    levels = list(dict.fromkeys(noise.levels))
    check_sweep(dest, levels=levels, reference=reference, simulation=simulation)
    params = resolved_parameters(
        methods=methods,
        reference=reference,
        device=device,
        ccstae_preset=ccstae_preset,
        ccstae=ccstae,
        py4dstem=py4dstem,
    )
    methods = params["methods"]
    configs = {"ccstae": params["ccstae"], "py4dstem": params["py4dstem"]}
    name = locate(dest).name
    work = work_folder(dest, workdir)

    # 1. The clean scan, then its noisy copies in parallel (w = 0 is the clean scan itself).
    if _same_simulation(dest, simulation):
        logger.info("%s already holds this simulation, kept", redact(dest))
        clean = {"url": redact(dest), "status": "kept"}
    else:
        clean = {**simulate_scan.submit(simulation, dest).result(), "status": "written"}
    source = _identity(dest)["content_sha256"]
    scans = {level: {"url": dest if level == 0 else noisy_url(dest, level)} for level in levels}
    copies = {}
    for level, copy in scans.items():
        if level == 0 or _same_copy(copy["url"], source, level, noise):
            copy["status"] = "clean" if level == 0 else "kept"
        else:
            copies[level] = noise_scan.submit(dest, copy["url"], level, noise.counts, noise.seed)

    # 2. Both methods on every level against one reference region, each level as soon as its
    #    scan is there: all in parallel on the cluster.
    region = _truth_reference(dest, work) if reference == "truth" else reference
    outputs: dict[tuple[float, str], str] = {}
    status: dict[tuple[float, str], dict[str, Any]] = {}
    futures: dict[tuple[float, str], list[Any]] = {}
    for level in [*(w for w in levels if w not in copies), *copies]:
        if level in copies:
            copies[level].result()
            scans[level]["status"] = "written"
        scan = scans[level]["url"]
        stem = locate(noisy_url(dest, level)).name[: -len(".zarr")]
        for method in methods:
            config = configs[method]
            key = run_key(
                _identity(scan), method, reference=reference, symmetry="auto", config=config
            )
            pair = (level, method)
            outputs[pair] = work.child(method).child(f"{stem}.zarr").url
            status[pair] = {"status": "skipped", "url": redact(outputs[pair])}
            if finished_step(outputs[pair], key):
                logger.info("w = %g, %s: finished in an earlier run, skipped", level, method)
            elif method == "py4dstem":
                futures[pair] = [
                    py4dstem_strain_scan.submit(
                        scan, outputs[pair], reference=region, config=config, run_key=key
                    )
                ]
            else:
                model_dir = work.child(method).child(f"model-{key[:12]}").url
                with gpu_resources():
                    trained = train_ccstae.submit(
                        scan, model_dir, reference=region, config=config, device=device
                    )
                    inferred = infer_ccstae.submit(
                        scan,
                        outputs[pair],
                        model_dir,
                        reference=region,
                        config=config,
                        device=device,
                        run_key=key,
                        wait_for=[trained],
                    )
                futures[pair] = [trained, inferred]
    for pair, steps in futures.items():
        status[pair]["status"] = "done"
        for future in steps:
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, StemflowError):  # the method refuses this scan: no answer
                logger.warning("w = %g, %s gave no answer: %s", *pair, outcome)
                status[pair].update(status="failed", error=str(outcome))
                break
            if isinstance(outcome, BaseException):
                raise outcome

    # 3. Score every map against the truth (small maps: here, not on the cluster), beside the
    #    least error each level's counts allow, and publish.
    for pair, url in outputs.items():
        if status[pair]["status"] != "failed":
            status[pair].update(score_strain(url, scans[pair[0]]["url"], pair[1]))
    least = least_errors_scan(dest, backgrounds=levels, counts=noise.counts)
    rows = [
        _row(level, scans[level], {m: status[level, m] for m in methods}, bound)
        for level, bound in zip(levels, least, strict=True)
    ]
    table = sweep_table(rows)
    record = {
        "created": utc_now(),
        "clean": clean,
        "simulation": simulation.model_dump(mode="json"),
        "noise": noise.model_dump(mode="json"),
        "reference": reference,
        "configs": {m: configs[m].model_dump(mode="json") for m in methods},
        "software": software_versions(),
        "rows": rows,
    }
    _write(table_url(dest, "md"), f"# Noise sweep, {name}\n\n{table}\n".encode())
    _write(
        table_url(dest, "json"), json.dumps(json_values(record), indent=2, allow_nan=False).encode()
    )
    create_markdown_artifact(
        key="noise-sweep",
        markdown=f"## Noise sweep, {name}\n\n{table}\n\nTables: "
        f"`{redact(table_url(dest, 'md'))}`, `{redact(table_url(dest, 'json'))}`",
        description="Both methods' MAE against the truth per background level, beside the paper's",
    )
    logger.info("noise sweep of %s\n%s", redact(dest), table)
    return rows


def check_sweep(
    dest: str, *, levels: list[float], reference: str, simulation: SimulationConfig
) -> None:
    """Refuse a sweep that cannot run, before any work.

    Raises
    ------
    InputError
        One sentence naming the argument and the fix: no level, a reference region that does
        not fit the scan, or a ``dest`` that exists and is not a simulated scan store.
    """
    if not levels:
        raise InputError(
            "noise.levels is empty; give at least one background weight in [0, 1], "
            "e.g. [0, 0.25, 0.5]."
        )
    if reference != "truth":
        parse_reference(reference, simulation.scan)
    where = locate(dest)
    if where.exists():
        attrs = read_store_attrs(where)
        if attrs is None or "simulation" not in attrs or "noise_model" in attrs:
            raise InputError(
                f"dest {redact(dest)} already exists and is not a clean simulated scan store; "
                "choose another destination."
            )


def _identity(url: str) -> dict[str, Any]:
    """:func:`stemlib.rerun.scan_identity` of a store this sweep has just found or written."""
    identity = scan_identity(url)
    if identity is None:  # removed while the sweep ran
        raise InputError(f"scan store {redact(url)} disappeared during the sweep; run it again.")
    return identity


def _same_simulation(url: str, simulation: SimulationConfig) -> bool:
    """Whether ``url`` is a finished clean scan store simulated with ``simulation``."""
    return finished_scan(url, simulation_recipe(simulation)) is not None


def _same_copy(url: str, source: str, level: float, noise: NoiseLevels) -> bool:
    """Whether ``url`` is a finished copy of the clean scan with content hash ``source`` at
    this level, dose and seed."""
    recipe = noise_recipe(source, background=level, counts=noise.counts, seed=noise.seed)
    return finished_scan(url, recipe) is not None


def _truth_reference(scan: str, work: Location) -> str:
    """Save the truth's reference grain of ``scan`` as ``reference.npy`` in ``work``; its URL."""
    truth = open_truth(scan)
    if truth is None or "reference_mask" not in truth:
        raise InputError(
            f"{redact(scan)} has no true reference grain; pass reference='auto' or a region."
        )
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(truth["reference_mask"].values, bool))
    where = work.child("reference.npy")
    with storage_errors(where.url):
        same = where.exists() and where.fs.cat_file(where.path) == buffer.getvalue()
    if not same:
        _write(where.url, buffer.getvalue())
    return where.url


def _write(url: str, content: bytes) -> None:
    """Write a small file in one piece to a path or URL."""
    location = locate(url)
    with storage_errors(location.url):
        if location.is_local:
            location.fs.makedirs(posixpath.dirname(location.path), exist_ok=True)
        location.fs.pipe_file(location.path, content)


def _row(
    level: float,
    scan: dict[str, Any],
    methods: dict[str, dict[str, Any]],
    least: dict[str, float] | None,
) -> dict[str, Any]:
    """One level's row of the table (JSON-ready: NaN as None)."""
    finite = {m: _finite(r) for m, r in methods.items()}
    p4, cc = finite.get("py4dstem", {}), finite.get("ccstae", {})
    ratio = {c: _ratio(cc.get(c), p4.get(c)) for c in PAPER_COMPONENTS} if p4 and cc else None
    percent = paper_percent(level)
    paper = (
        None
        if percent is None
        else {"percent": percent, "mae": paper_mae(percent), "ratio": paper_ratio(percent)}
    )
    return {
        "level": level,
        "scan": {**scan, "url": redact(scan["url"])},
        "methods": finite,
        "ratio": ratio,
        "paper": paper,
        "least": None if least is None else _finite(least),
    }


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every non-finite float as None (JSON has no NaN or infinity)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()
    }


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


# python -m flows.noise_sweep ARGS... is stemflow sweep ARGS...
if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
