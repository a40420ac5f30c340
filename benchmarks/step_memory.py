"""Memory per pattern of each CC-ST-AE step, measured against the estimates that size them.

The steps are sized to the device's memory by :mod:`stemlib.ccstae.memory`, whose estimates
were measured on a CPU in float32; on a GPU the network runs under bf16 autocast (and, with
``compile``, through ``torch.compile``), so they are a bound there, not a figure. This
benchmark measures each step at two batch sizes on simulated patterns and takes the growth per
pattern between them (fixed costs cancel): on CUDA from ``torch.cuda.max_memory_allocated``, on
a CPU from the kernel's high-water mark of the process's memory (VmHWM, each measurement in a
fresh interpreter). The steps, as the pipeline runs them:

- ``inference``: the encoder (under the preset's autocast) and the per-pattern refinement
  (least squares, rigid disks, the isotropic background, ``refine_steps`` steps);
- ``training``: one forward and backward pass of the cycle loss (autocast as in training);
- ``search``: the rotation search's beams and polar features;
- ``bases``: the starting bases' registration and solve (one round).

A ratio measured / estimate below 1 means the steps are sized safely; well below 1 (say under
0.3) that they are cut smaller than they need be, and :data:`~stemlib.ccstae.memory.SHARE` or
the constants could rise for that device.

Measured here (2-core CPU, cpu preset, batches of 16 and 64,
``benchmarks/results/step-memory-cpu-cpu.md``): measured / estimate 0.43-0.94 for every step
at 64-256 px; repeated runs move single figures by up to 20 %.

Usage::

    python benchmarks/step_memory.py --sizes 64,128,256 --batches 16,64   # the CPU, cpu preset
    python benchmarks/step_memory.py --device cuda --preset gpu --sizes 128,256 --batches 16,64

Results go to ``benchmarks/results/step-memory-<device>-<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import torch
from _results import save_results

from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.loss import cycle_loss
from stemlib.ccstae.memory import TEMPLATE_VALUES_PER_PIXEL, pattern_bytes, search_bytes
from stemlib.ccstae.model import mixed_precision
from stemlib.ccstae.refine import radial_background, refine_affine, rigid_disk_model
from stemlib.ccstae.rotation import centred_features
from stemlib.ccstae.template import learn_bases
from stemlib.masks import ring_mask
from stemlib.simulate import SimulationConfig, simulate

STEPS = ("inference", "training", "search", "bases")
MB = 1e6


def _patterns(size: int, n: int, device: torch.device) -> torch.Tensor:
    """``n`` simulated patterns of ``size`` px (3 grains, 8 x 8 positions repeated), square-root
    intensities scaled to 1 as the pipeline preprocesses them: (n, 1, size, size) float32."""
    sim = simulate(SimulationConfig(scan=(8, 8), pattern=size, grains=3, seed=1))
    data = np.sqrt(np.asarray(sim["data"].values, np.float32).reshape(-1, 1, size, size))
    data = np.concatenate([data] * math.ceil(n / len(data)))[:n]
    return torch.from_numpy(data / data.max()).to(device)


def _geometry(size: int) -> dict:
    """Centre, ring (px) and beam radius of the simulated patterns."""
    return {
        "center": (size / 2, size / 2),
        "radii": (0.08 * size, 0.44 * size),
        "beam": 0.05 * size,
    }


def step_function(step: str, size: int, n: int, preset: str, device: torch.device):
    """A function that runs ``step`` on ``n`` patterns of ``size`` px (data prepared first)."""
    config = CCSTAEConfig.preset(preset)
    geo = _geometry(size)
    center, radii = geo["center"], geo["radii"]
    x = _patterns(size, n, device)
    ring = torch.from_numpy(ring_mask((size, size), inner=radii[0], outer=radii[1], center=center))
    ring = ring.float().to(device)
    if step in ("inference", "training"):
        model = build_model(config, pattern_shape=(size, size), center=center).to(device)
    if step == "inference":
        base = x.mean(0, keepdim=True)
        bg = radial_background(base, center=center)
        lattice = base - bg
        labels, centres = rigid_disk_model(
            lattice, center=center, inner=radii[0], disk_radius=geo["beam"]
        )
        A = torch.eye(2, device=device).expand(n, 2, 2)

        def run() -> None:
            with torch.no_grad():
                with mixed_precision(device, config.amp):
                    model.encode(x)
                refine_affine(
                    x,
                    lattice.expand(n, -1, -1, -1),
                    A,
                    torch.zeros(n, 2, device=device),
                    ring,
                    center=center,
                    steps=config.refine_steps,
                    background=bg.expand(n, -1, -1, -1),
                    disks=(labels.expand(n, -1, -1, -1), centres.expand(n, -1, -1)),
                )

    elif step == "training":

        def run() -> None:
            with mixed_precision(device, config.amp):
                out = model(x)
            cycle_loss(out, x, ring, config, center=model.center).total.backward()

    elif step == "search":

        def run() -> None:
            centred_features(
                x,
                center=center,
                radius=geo["beam"] + 0.08 * size,
                radii=radii,
                n_angles=config.search_angles,
                block=n,
            )

    else:

        def run() -> None:
            learn_bases(
                x,
                torch.zeros(n, device=device),
                ring,
                num_bases=1,
                center=center,
                rounds=1,
                steps=config.template_steps,
                batch_size=n,
                background=True,
                disk_radius=geo["beam"],
                inner=radii[0],
            )

    return run


def estimate(step: str, size: int, preset: str) -> float:
    """memory.py's bytes per pattern of ``step``."""
    if step in ("inference", "training"):
        config = CCSTAEConfig.preset(preset)
        model = build_model(config, pattern_shape=(size, size), center=_geometry(size)["center"])
        return pattern_bytes(model, (size, size), training=step == "training")
    if step == "search":
        config = CCSTAEConfig.preset(preset)
        return search_bytes(
            (size, size), radii=_geometry(size)["radii"], n_angles=config.search_angles
        )
    return 4 * TEMPLATE_VALUES_PER_PIXEL * size * size


def peak(step: str, size: int, n: int, preset: str, device: torch.device) -> float:
    """Bytes that ``step`` on ``n`` patterns adds at its peak to what its data holds."""
    run = step_function(step, size, n, preset, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    run()
    return float(status("VmHWM") - before)


def measured(step: str, size: int, n: int, preset: str, device: torch.device) -> float:
    """:func:`peak`, on a CPU in a fresh interpreter (freed memory a process keeps would hide
    the next step's growth)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return peak(step, size, n, preset, device)
    out = subprocess.run(
        [sys.executable, __file__, "--one", step, str(size), str(n), preset],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--sizes", default="64,128", help="pattern sizes (px)")
    parser.add_argument("--batches", default="8,32", help="the two batch sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"of {', '.join(STEPS)}")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # step size n preset, CPU
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.one:
        torch.set_num_threads(1)
        step, size, n, preset = args.one
        print(peak(step, int(size), int(n), preset, torch.device("cpu")))
        return
    device = torch.device(args.device)
    small, large = (int(b) for b in args.batches.split(","))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for step in args.steps.split(","):
            grown = measured(step, size, large, args.preset, device) - measured(
                step, size, small, args.preset, device
            )
            per_pattern = grown / (large - small)
            bound = estimate(step, size, args.preset)
            rows.append(
                {
                    "size": size,
                    "step": step,
                    "measured_mb": per_pattern / MB,
                    "estimate_mb": bound / MB,
                    "ratio": per_pattern / bound,
                }
            )
            r = rows[-1]
            print(
                f"{size:4d} px  {step:9s}  {r['measured_mb']:8.2f} MB  estimate "
                f"{r['estimate_mb']:8.2f} MB  ratio {r['ratio']:.2f}",
                flush=True,
            )
    name = f"step-memory-{device.type}-{args.preset}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "this machine's CPU"
    lines = [
        f"# {__doc__.splitlines()[0]}",
        "",
        f"{where}, {args.preset} preset, batches of {small} and {large} patterns; MB per pattern.",
        "",
        "| pattern px | step | measured | estimate | measured / estimate |",
        "|---|---|---|---|---|",
        *(
            f"| {r['size']} | {r['step']} | {r['measured_mb']:.2f} | {r['estimate_mb']:.2f} | "
            f"{r['ratio']:.2f} |"
            for r in rows
        ),
    ]
    path = save_results(name, "\n".join(lines) + "\n", {"args": vars(args), "rows": rows})
    print(json.dumps(rows[-1]) if rows else "", f"\nwrote {path}")


if __name__ == "__main__":
    main()
