"""Memory against scan size: every command of a strain run, on scans of growing size.

A 256 x 256 scan of 256 px patterns (8.6 GB as uint16, 17 GB as float32) must run on a 24 GB
machine, so no step may hold the scan, or anything per pattern of pattern size, in memory.
Running the whole pipeline at that size takes hours on a CPU; this benchmark runs each command
the way a user does (``stemflow simulate``, ``noise``, ``strain --method ccstae`` and
``strain --method py4dstem``, each in its own process) on scans of growing size and prints
each one's peak resident memory (its whole process tree: py4DSTEM's Dask workers included)
and wall time. Memory that stays flat as the scan grows 16-fold is what a 256^4 scan needs.

Usage::

    python benchmarks/scale.py                                  # 32, 64, 128 positions of 128 px
    python benchmarks/scale.py --sizes 32x128,64x256 --epochs 1
    python benchmarks/scale.py --sizes 256x256 --epochs 0 --refine-steps 0   # the full size
    python benchmarks/scale.py --sizes 16x256 --commands simulate,noise,ccstae --preset gpu \
        --epochs 1   # the gpu preset on a CPU: its steps sized to this machine's memory

Results go to ``benchmarks/results/scale-<sizes>-<device>.{json,md}``, with ``-<preset>-preset``
appended where ``--preset`` is not the device's, and the commands where ``--commands`` names
only some.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _memory import run_sampled
from _results import save_results

GB = 1e9
COMMANDS = ("simulate", "noise", "ccstae", "py4dstem")


def _stemflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def command_lines(
    folder: Path, scan: int, pattern: int, ccstae: dict[str, Any], device: str
) -> dict:
    """The four command lines for one scan size (each step reads the one before); ``ccstae``:
    settings that change the device's CC-ST-AE preset."""
    sim, noisy = folder / "sim.zarr", folder / "noisy.zarr"
    config = folder / "ccstae.yaml"
    config.write_text("".join(f"{key}: {value}\n" for key, value in ccstae.items()))
    return {
        "simulate": _stemflow(
            "simulate", str(sim), "--scan", f"{scan},{scan}", "--pattern", str(pattern), "--quiet"
        ),
        "noise": _stemflow("noise", str(sim), str(noisy), "--background", "0.25", "--quiet"),
        "ccstae": _stemflow(
            "strain",
            str(noisy),
            str(folder / "ccstae.zarr"),
            "--method",
            "ccstae",
            "--config",
            str(config),
            "--device",
            device,
        ),  # fmt: skip
        "py4dstem": _stemflow(
            "strain", str(noisy), str(folder / "py4dstem.zarr"), "--method", "py4dstem"
        ),
    }


def measure(
    scan: int, pattern: int, commands: list[str], ccstae: dict[str, Any], device: str
) -> dict[str, Any]:
    """Peak RSS (bytes) and seconds of ``commands`` on a ``scan`` x ``scan`` scan."""
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg"}
    row: dict[str, Any] = {"scan": scan, "pattern": pattern, "patterns": scan * scan}
    with tempfile.TemporaryDirectory(prefix="stemflow-scale-") as tmp:
        lines = command_lines(Path(tmp), scan, pattern, ccstae, device)
        for name in commands:
            args = lines[name]
            start = time.perf_counter()
            child, _, peak = run_sampled(args, cwd=repo, env=env)
            if child.returncode:
                raise SystemExit(f"{name} on {scan} x {scan} x {pattern} px failed")
            row[name] = {"peak_rss": peak, "seconds": time.perf_counter() - start}
            print(f"  {scan} x {scan} x {pattern} px: {name} {peak / GB:.2f} GB", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = "| scan | patterns | float32 GB | " + " | ".join(f"{c} peak GB (s)" for c in COMMANDS)
    lines = [head + " |", "|---" * (3 + len(COMMANDS)) + "|"]
    for r in rows:
        size = r["patterns"] * r["pattern"] ** 2 * 4 / GB
        cells = [
            f"{r[c]['peak_rss'] / GB:.2f} ({r[c]['seconds']:.0f})" if c in r else "-"
            for c in COMMANDS
        ]
        lines.append(
            f"| {r['scan']} x {r['scan']} x {r['pattern']} px | {r['patterns']} | {size:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="32x128,64x128,128x128",
        help="scans as POSITIONSxPATTERN, comma-separated (default 32x128,64x128,128x128)",
    )
    parser.add_argument(
        "--commands",
        default=",".join(COMMANDS),
        help=f"which commands, in order (default {','.join(COMMANDS)}; each needs the one "
        "before it, ccstae and py4dstem need noise)",
    )
    parser.add_argument("--epochs", type=int, default=1, help="CC-ST-AE epochs (default 1)")
    parser.add_argument(
        "--refine-steps", type=int, help="CC-ST-AE refinement steps (default: the preset's)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--preset",
        choices=["cpu", "gpu"],
        help="CC-ST-AE preset (default: the device's); gpu on a CPU gives the gpu preset's "
        "memory, a proxy for what it needs on a GPU",
    )
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    commands = args.commands.split(",")
    ccstae: dict[str, Any] = {"epochs": args.epochs}
    if args.preset:
        ccstae = {"preset": args.preset, **ccstae}
    if args.refine_steps is not None:
        ccstae["refine_steps"] = args.refine_steps
    rows = [measure(scan, pattern, commands, ccstae, args.device) for scan, pattern in sizes]
    name = f"scale-{args.sizes.replace(',', '-')}-{args.device}"
    if args.preset and args.preset != {"cpu": "cpu", "cuda": "gpu"}[args.device]:
        name += f"-{args.preset}-preset"
    if commands != list(COMMANDS):  # a part of the run: beside a whole one of the same size
        name += "-" + "-".join(commands)
    settings = ", ".join(f"{key} {value}" for key, value in ccstae.items())
    text = (
        f"# Peak memory against scan size ({args.device}; CC-ST-AE {settings})\n\n"
        f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}; peak "
        "RSS of each command's process tree, wall seconds in brackets\n\n"
        f"{table(rows)}\n"
    )
    print(text)
    save_results(name, text, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
