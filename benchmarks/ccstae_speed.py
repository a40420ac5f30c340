"""CC-ST-AE speed: training time per epoch and inference patterns/s, on CPU and on a GPU.

A simulated scan of ``--n`` patterns of ``--pattern`` px (default 65,536 of 128 px, the paper's
256 x 256 scan), with the paper's noise at ``--background`` (default 50 %), is written to a
temporary Zarr store first (not timed). Then, per device
(``--devices``: CUDA where present, else the CPU; ``cpu,cuda`` for both side by side), with the
preset of that device:

- the starting stage (statistics, rotation search and starting bases on the sample), seconds;
- training epochs over the whole scan, streamed from the store (``--epochs``, default 2): the
  first epoch's seconds (on CUDA it holds ``torch.compile``'s compilation) and the last one's,
  with its patterns/s;
- inference of the whole scan: the network alone, and with the per-pattern refinement
  (the default), patterns/s;
- the refined maps' mean absolute error against the scan's truth (exx/eyy/exy, 1e-3), so that
  ``--epochs`` shows how many epochs the preset needs to converge.

Usage::

    python benchmarks/ccstae_speed.py --n 1024           # a quick run (CPU without a GPU)
    python benchmarks/ccstae_speed.py                    # 65,536 patterns on the GPU
    python benchmarks/ccstae_speed.py --n 4096 --devices cpu,cuda   # both, side by side

Goals (issue 6): >= 20,000 patterns/s inference on one H100; training that converges in < 10 min
there. Results go to ``benchmarks/results/ccstae-speed-<n>x<pattern>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stemlib.ccstae import CCSTAEConfig, ccstae_strain, train_on_scan
from stemlib.io import open_scan
from stemlib.metrics import strain_errors
from stemlib.noise import noise_store
from stemlib.provenance import software_versions, utc_now
from stemlib.simulate import SimulationConfig, write_simulation
from stemlib.truth import open_truth

RESULTS = Path(__file__).parent / "results"


def measure(store: str, device: str, *, preset: str, epochs: int = 2) -> dict[str, Any]:
    """Time the stages of one device on the scan store, through the public entry points: the
    timings that :func:`train_on_scan` and :func:`ccstae_strain` record (CUDA work is synchronous
    by the end of each, as every batch's result is copied back). Strain is measured against the
    truth's reference grain."""
    config = CCSTAEConfig.preset(preset, epochs=epochs)
    scan = open_scan(store)
    truth = open_truth(store)
    n = int(np.prod(scan.shape[:2]))
    out: dict[str, Any] = {"device": device, "preset": preset, "patterns": n, "epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="stemflow-speed-work-") as work:
        reference = str(Path(work) / "reference.npy")
        np.save(reference, truth["reference_mask"].values)
        trained = train_on_scan(
            scan,
            workdir=str(Path(work) / "model"),
            reference=reference,
            config=config,
            device=device,
            progress=False,
        )
        timings, epoch_s = trained["timings_s"], trained["epoch_s"]
        out["starting_stage_s"] = timings["statistics_s"] + timings["rotation_search_s"]
        out["first_epoch_s"] = epoch_s[0]
        out["train_epoch_s"] = epoch_s[-1]  # the steady state, after any compilation
        out["train_patterns_per_s"] = n / epoch_s[-1]
        for name, steps in (("infer_network_only", 0), ("infer_refined", config.refine_steps)):
            ds = ccstae_strain(
                scan,
                reference=reference,
                config=config.model_copy(update={"refine_steps": steps}),
                device=device,
                workdir=str(Path(work) / "model"),
                progress=False,
            )
            record = ds.attrs["methods"]["ccstae"]
            out[f"{name}_patterns_per_s"] = n / record["timings_s"]["inference_s"]
        errors = strain_errors(ds.isel(method=0), truth, symmetry=int(record["symmetry"]))
        out["refined_mae_1e3"] = {k: errors[k] * 1e3 for k in ("exx", "eyy", "exy")}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| device | preset | patterns | starting stage (s) | first epoch (s) | last epoch (s) | "
        "train patterns/s (last epoch) | infer network only (patterns/s) | "
        "infer refined (patterns/s) | epochs | refined MAE exx/eyy/exy (1e-3) |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['preset']} | {r['patterns']} | {r['starting_stage_s']:.1f} | "
            f"{r['first_epoch_s']:.1f} | {r['train_epoch_s']:.1f} | "
            f"{r['train_patterns_per_s']:.0f} | {r['infer_network_only_patterns_per_s']:.0f} | "
            f"{r['infer_refined_patterns_per_s']:.0f} | {r['epochs']} | "
            + "/".join(f"{r['refined_mae_1e3'][k]:.2f}" for k in ("exx", "eyy", "exy"))
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=65536, help="patterns (a square scan of about n)")
    parser.add_argument("--pattern", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument(
        "--devices", default="auto", help="comma list of cpu,cuda (auto: cuda if present, else cpu)"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=2,
        help="epochs timed per device (default 2: the first holds torch.compile's compilation)",
    )
    parser.add_argument(
        "--background", type=float, default=0.5, help="noise background weight w (0: clean)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    side = max(1, int(math.isqrt(args.n)))
    devices = (
        ["cuda" if torch.cuda.is_available() else "cpu"]
        if args.devices == "auto"
        else args.devices.split(",")
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="stemflow-speed-") as tmp:
        store = str(Path(tmp) / "scan.zarr")
        write_simulation(
            SimulationConfig(
                scan=(side, side), pattern=args.pattern, grains=8, max_rot_deg=180.0, seed=0
            ),
            store,
        )
        if args.background > 0:
            noisy = str(Path(tmp) / "noisy.zarr")
            noise_store(store, noisy, background=args.background, counts=1e5, seed=0)
            store = noisy
        for name in devices:
            print(f"  {name} ...", file=sys.stderr, flush=True)
            rows.append(
                measure(
                    store,
                    name,
                    preset="gpu" if name == "cuda" else "cpu",
                    epochs=args.epochs,
                )
            )
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = f"ccstae-speed-{side * side}x{args.pattern}"
    record = {
        "created": utc_now(),
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch_threads": args.threads,
        },
        "versions": software_versions(),
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{name}.md").write_text(
        f"# CC-ST-AE speed, {side * side} patterns of {args.pattern} px\n\n{text}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
