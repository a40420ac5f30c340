"""Accuracy: CC-ST-AE against the py4DSTEM baseline on the same scans, with the paper's ratios.

Two parts, each in one run:

1. **Simulated grains, the paper's protocol** (Qin, Tran, Agar 2023, Fig. 3): one simulated
   scan of Voronoi grains (strain and shear uniform in +-2 %, rotations over the full circle,
   one unstrained reference grain; :mod:`stemlib.simulate`), and one noisy copy per background
   level of the paper's model (0-70 %, 1e5 counts; :mod:`stemlib.noise`). Both methods get the
   same scan and the same reference region (the true reference grain). Printed per level: the
   MAE of exx, eyy, exy (1e-3) and theta (deg) for py4DSTEM and CC-ST-AE, their ratio, the
   paper's ratio beside it, each method's coverage, and the least MAE that any unbiased
   per-pattern estimator can reach on those counts (the Cramér-Rao bound of
   :mod:`stemlib.bounds`, from the clean patterns). ``--hard`` uses the simulator's hardest
   settings (soft edges, falloff, gradients inside disks, descan, ellipticity, vacuum).
2. **Multislice scans** (``--multislice``): the shared abTEM scans (Si [001] clean, w = 0.5,
   dose 1000; WS2 clean, w = 0.5), same table; the goal there is half of py4DSTEM's error.

Usage::

    python benchmarks/accuracy.py --quick                   # CPU: 32 x 32 x 128 px, 4 levels
    python benchmarks/accuracy.py --multislice --no-simulated
    python benchmarks/accuracy.py --scan 256 --pattern 200 --preset gpu --device cuda   # paper size

Results go to ``benchmarks/results/accuracy-<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import h5py
import numpy as np
import torch

from stemlib.baseline_py4dstem import py4dstem_strain
from stemlib.bounds import least_errors
from stemlib.ccstae import CCSTAEConfig, ccstae_strain
from stemlib.devdata import abtem_dev_path, read_abtem_dev, write_abtem_dev
from stemlib.errors import InputError
from stemlib.io import open_scan
from stemlib.metrics import strain_errors
from stemlib.noise import noise_store
from stemlib.paper import PAPER, paper_ratio
from stemlib.paper import PAPER_COMPONENTS as COMPONENTS
from stemlib.provenance import software_versions, utc_now
from stemlib.simulate import SimulationConfig, write_simulation
from stemlib.truth import open_truth

RESULTS = Path(__file__).parent / "results"

MULTISLICE = (
    "dev_si001_32x32_128px_12grains_seed11_clean",
    "dev_si001_32x32_128px_12grains_seed11_auto4dstem50",
    "dev_si001_32x32_128px_12grains_seed11_dose1000",
    "dev_ws2_32x32_128px_12grains_seed12_clean",
    "dev_ws2_32x32_128px_12grains_seed12_auto4dstem50",
)


def score(
    store: str, reference: str, *, config: CCSTAEConfig, device: str, workdir: Path
) -> dict[str, Any]:
    """Run both methods on ``store`` against ``reference`` and score them on the stored truth."""
    scan = open_scan(store)
    truth = open_truth(store)
    symmetry = int(truth.attrs["symmetry"])
    mask = np.isfinite(truth["exx"].values)  # vacuum has no truth
    out: dict[str, Any] = {"symmetry": symmetry}
    start = time.perf_counter()
    try:
        with dask.config.set(scheduler="threads"):
            p4 = py4dstem_strain(scan, reference=reference)
        p4_errors = strain_errors(p4.isel(method=0), truth, symmetry=symmetry, mask=mask)
    except InputError as exc:  # the baseline refuses the scan: no answer anywhere
        p4_errors = {"coverage": 0.0, **dict.fromkeys(("exx", "eyy", "exy", "theta"), float("nan"))}
        out["py4dstem_error"] = str(exc)
    out["py4dstem"] = {**p4_errors, "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    cc = ccstae_strain(
        scan,
        reference=reference,
        config=config,
        device=device,
        workdir=str(workdir),
        progress=False,
    )
    out["ccstae"] = {
        **strain_errors(cc.isel(method=0), truth, symmetry=symmetry, mask=mask),
        "seconds": time.perf_counter() - start,
    }
    # The network's own warps, before the per-pattern refinement (same checkpoint, inference only).
    net = ccstae_strain(
        scan,
        reference=reference,
        config=config.model_copy(update={"refine_steps": 0}),
        device=device,
        workdir=str(workdir),
        progress=False,
    )
    out["ccstae_network_only"] = strain_errors(
        net.isel(method=0), truth, symmetry=symmetry, mask=mask
    )
    out["ccstae_symmetry"] = cc.attrs["methods"]["ccstae"]["symmetry"]
    return out


def _reference_file(store: str, folder: Path) -> str:
    path = folder / "reference.npy"
    np.save(path, open_truth(store)["reference_mask"].values)
    return str(path)


def run_simulated(
    args: argparse.Namespace, config: CCSTAEConfig, folder: Path, on_row: Callable[[dict], None]
) -> None:
    make = SimulationConfig.hard if args.hard else SimulationConfig
    sim = make(
        scan=(args.scan, args.scan),
        pattern=args.pattern,
        grains=args.grains,
        lattice=args.lattice,
        max_strain=0.02,
        max_rot_deg=180.0,
        seed=args.seed,
    )
    clean = str(folder / "clean.zarr")
    write_simulation(sim, clean)
    reference = _reference_file(clean, folder)
    step = max(1, args.scan // 16)  # about 256 clean patterns for the bound
    sample = np.asarray(open_scan(clean).data[::step, ::step]).reshape(
        -1, args.pattern, args.pattern
    )
    # The MAE counts crystal positions only, so must the bound: a vacuum pattern has no lattice
    # and a near-singular information (at 10 % vacuum it raised the bound by 25 %).
    crystal = np.isfinite(open_truth(clean)["exx"].values[::step, ::step]).reshape(-1)
    sample = sample[crystal]
    for level in args.levels:
        store = clean
        if level > 0:
            store = str(folder / f"noise{level}.zarr")
            noise_store(clean, store, background=level / 100, counts=1e5, seed=args.seed)
        print(f"  simulated, {level} % background ...", file=sys.stderr, flush=True)
        result = score(
            store, reference, config=config, device=args.device, workdir=folder / f"work{level}"
        )
        on_row(
            {
                "data": f"simulated {level} %",
                "level": level,
                **result,
                "paper_ratio": paper_ratio(level) if level in PAPER else None,
                "bound": least_errors(sample, counts=1e5, background=level / 100)
                if level > 0
                else None,
            }
        )


def multislice_bound(name: str) -> dict[str, float] | None:
    """The least MAE on a noisy multislice scan, from its clean twin (None for a clean scan)."""
    with h5py.File(abtem_dev_path(name), "r") as f:
        if "datacube" not in f:
            return None
        model, level, counts = (f.attrs[k] for k in ("noise_model", "noise_level", "counts"))
    clean = read_abtem_dev(abtem_dev_path(name.rsplit("_", 1)[0] + "_clean")).data
    sample = clean[::2, ::2].reshape((-1,) + clean.shape[2:])
    return least_errors(
        sample, counts=float(counts), background=float(level) if model == "auto4dstem" else 0.0
    )


def run_multislice(
    args: argparse.Namespace, config: CCSTAEConfig, folder: Path, on_row: Callable[[dict], None]
) -> None:
    for name in [n for n in MULTISLICE if not args.only or any(o in n for o in args.only)]:
        store = str(folder / f"{name}.zarr")
        write_abtem_dev(abtem_dev_path(name), store)
        sub = folder / name
        sub.mkdir()
        print(f"  multislice {name} ...", file=sys.stderr, flush=True)
        result = score(
            store,
            _reference_file(store, sub),
            config=config,
            device=args.device,
            workdir=sub / "work",
        )
        on_row(
            {
                "data": name.replace("dev_", "").replace("_32x32_128px_12grains", ""),
                **result,
                "paper_ratio": None,
                "bound": multislice_bound(name),
            }
        )


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | exx py4D | exx ours | eyy py4D | eyy ours | exy py4D | exy ours | ratio "
        "exx/eyy/exy | "
        "paper ratio | theta deg py4D / ours | coverage py4D / ours | ours, network only "
        "(exx/eyy/exy) | least possible (exx/eyy/exy) |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        p, c, n = r["py4dstem"], r["ccstae"], r["ccstae_network_only"]
        ratio = "/".join(f"{c[k] / p[k]:.2f}" if p[k] > 0 else "-" for k in COMPONENTS)
        paper = "/".join(f"{v:.2f}" for v in r["paper_ratio"].values()) if r["paper_ratio"] else "-"
        cells = [f"{p[k] * 1e3:.2f} | {c[k] * 1e3:.2f}" for k in COMPONENTS]
        lines.append(
            f"| {r['data']} | {' | '.join(cells)} | {ratio} | {paper} | "
            f"{np.degrees(p['theta']):.3f} / {np.degrees(c['theta']):.3f} | "
            f"{p['coverage']:.3f} / {c['coverage']:.3f} | "
            + "/".join(f"{n[k] * 1e3:.2f}" for k in COMPONENTS)
            + " | "
            + (
                "/".join(f"{r['bound'][k] * 1e3:.2f}" for k in COMPONENTS)
                if r.get("bound")
                else "-"
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scan", type=int, default=32, help="simulated scan is SCAN x SCAN positions"
    )
    parser.add_argument("--pattern", type=int, default=128, help="simulated pattern size (px)")
    parser.add_argument("--grains", type=int, default=8)
    parser.add_argument(
        "--lattice", default="square", choices=["square", "hexagonal", "rectangular"]
    )
    parser.add_argument(
        "--levels", type=lambda s: [int(v) for v in s.split(",")], default=sorted(PAPER)
    )
    parser.add_argument("--quick", action="store_true", help="levels 0,20,50,70 only")
    parser.add_argument("--hard", action="store_true", help="the simulator's hardest settings")
    parser.add_argument("--multislice", action="store_true", help="also the shared abTEM scans")
    parser.add_argument("--no-simulated", action="store_true", help="skip the simulated part")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=None,
        help="multislice scans whose names hold one of these",
    )
    parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file name (default from the options)")
    args = parser.parse_args(argv)
    if args.quick:
        args.levels = [0, 20, 50, 70]
    torch.set_num_threads(args.threads)
    config = CCSTAEConfig.preset(
        args.preset, **({"epochs": args.epochs} if args.epochs is not None else {})
    )
    name = args.name or (
        f"{'hard-' if args.hard else ''}{args.scan}x{args.scan}x{args.pattern}-{args.preset}"
        + ("-multislice" if args.multislice else "")
    )
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        """Keep the row and rewrite the results, so that a long run leaves what it measured."""
        rows.append(row)
        text = table(rows)
        print(text.splitlines()[-1], flush=True)
        RESULTS.mkdir(exist_ok=True)
        record = {
            "created": utc_now(),
            "args": vars(args),
            "config": config.model_dump(mode="json"),
            "machine": {
                "platform": platform.platform(),
                "cuda": torch.cuda.is_available(),
                "torch_threads": args.threads,
            },
            "versions": software_versions(),
            "rows": rows,
        }
        (RESULTS / f"accuracy-{name}.json").write_text(json.dumps(record, indent=2, default=float))
        (RESULTS / f"accuracy-{name}.md").write_text(
            f"# Accuracy, {name}\n\nMAE in 1e-3 (strain), deg (theta); ratio = CC-ST-AE / "
            "py4DSTEM; least possible = the Cramér-Rao bound of an unbiased per-pattern "
            f"estimator on those counts (stemlib.bounds).\n\n{text}\n"
        )

    with tempfile.TemporaryDirectory(prefix="stemflow-accuracy-") as tmp:
        folder = Path(tmp)
        if not args.no_simulated:
            run_simulated(args, config, folder, on_row)
        if args.multislice:
            (folder / "multislice").mkdir()
            run_multislice(args, config, folder / "multislice", on_row)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
