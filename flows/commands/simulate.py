"""``stemflow simulate DEST``: a simulated scan of Voronoi grains with its ground truth.

With ``--levels``, the ``simulate-benchmark`` Prefect flow also writes one noisy copy per
background level beside DEST (the paper's model, CONVENTIONS.md section 3), in parallel.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from stemlib.io.storage import redact
from stemlib.simulate import LATTICE_SYMMETRY, SimulationConfig

from ._args import flag_error, int_pair

if TYPE_CHECKING:
    from flows.simulate_benchmark import NoiseLevels

__all__ = ["register", "config_from_args", "levels_from_args", "parse_levels"]


def parse_levels(text: str) -> list[float]:
    """``"paper"`` (0, 5, ..., 50, 60, 70 %) or comma-separated weights, e.g. ``0,0.25,0.5``."""
    if text.strip().lower() == "paper":
        from flows.simulate_benchmark import PAPER_LEVELS

        return list(PAPER_LEVELS)
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'paper' or weights like 0,0.25,0.5, got {text!r}"
        ) from None


def config_from_args(
    args: argparse.Namespace, base: SimulationConfig | None = None
) -> SimulationConfig:
    """The simulation the flags ask for; flags not given keep ``base``'s settings where it set
    them, else the defaults (or :meth:`SimulationConfig.hard`'s with ``--hard``).

    Raises
    ------
    InputError
        A value the configuration refuses, as one sentence naming its flag.
    """
    given: dict[str, Any] = {
        "scan": args.scan,
        "pattern": args.pattern,
        "grains": args.grains,
        "lattice": args.lattice,
        "max_strain": args.max_strain,
        "max_rot_deg": args.max_rot,
        "seed": args.seed,
    }
    given = {
        **(base.model_dump(exclude_unset=True) if base is not None else {}),
        **{k: v for k, v in given.items() if v is not None},
    }
    try:
        return SimulationConfig.hard(**given) if args.hard else SimulationConfig(**given)
    except ValidationError as exc:
        raise flag_error(exc, {"max_rot_deg": "--max-rot"}) from None


def levels_from_args(args: argparse.Namespace) -> NoiseLevels:
    """The noise levels ``--levels``, ``--counts`` and ``--noise-seed`` ask for.

    Raises
    ------
    InputError
        A value the levels refuse, as one sentence naming its flag.
    """
    from flows.simulate_benchmark import NoiseLevels

    try:
        return NoiseLevels(levels=args.levels, counts=args.counts, seed=args.noise_seed)
    except ValidationError as exc:
        raise flag_error(exc, {"seed": "--noise-seed"}) from None


def _verb(record: dict[str, Any]) -> str:
    """ "wrote", or "kept" for a store that already held this result."""
    return "kept" if record["status"] == "skipped" else "wrote"


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.levels is not None:
        from flows.api_server import temporary_api
        from flows.simulate_benchmark import simulate_benchmark

        noise = levels_from_args(args)
        with temporary_api():
            record = simulate_benchmark(dest=args.dest, simulation=config, noise=noise)
        clean = record["clean"]
        print(f"{_verb(clean)} {clean['url']}: data {tuple(clean['shape'])} float32 with truth")
        for level, copy in record["noisy"].items():
            print(
                f"  {float(level) * 100:g} % background: {_verb(copy)} {copy['url']} "
                f"({copy['dtype']})"
            )
        print(f"  open one with:  xr.open_zarr({record['clean']['url']!r})")
        return 0
    from tqdm.dask import TqdmCallback

    from stemlib.simulate import write_simulation

    start = time.perf_counter()
    with TqdmCallback(desc="simulate", unit="block", disable=args.quiet or None):
        result = write_simulation(config, args.dest)
    seconds = time.perf_counter() - start
    patterns = result.shape[0] * result.shape[1]
    url = redact(result.url)
    if result.status == "skipped":
        print(
            f"{url} already holds this simulation (same settings and seed): skipped.\n"
            f"  open it with:  xr.open_zarr({url!r})"
        )
        return 0
    print(
        f"wrote {url}: data {result.shape} {np.dtype(result.dtype)} "
        f"({patterns / seconds:.0f} patterns/s), "
        f"{config.grains} {config.lattice} grains (symmetry {LATTICE_SYMMETRY[config.lattice]}), "
        f"truth exx, eyy, exy, theta, grain_id, reference_mask\n"
        f"  open it with:  xr.open_zarr({url!r})  or  stemlib.truth.open_truth({url!r})"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    defaults = SimulationConfig()
    parser = sub.add_parser(
        "simulate",
        help="simulate a scan of strained Voronoi grains with its ground truth",
        description="Simulate a 4D-STEM scan of Voronoi grains, each a rotated and strained copy "
        "of "
        "one reference lattice (one grain unstrained), and stream it with its per-position truth "
        "(exx, eyy, exy, theta in CONVENTIONS.md's detector frame) into a Zarr v3 scan store.",
    )
    parser.add_argument(
        "dest", metavar="DEST", help="scan store to write: path or URL (s3://bucket/key)"
    )
    parser.add_argument(
        "--scan",
        type=int_pair,
        metavar="RX,RY",
        help=f"probe positions (default: {defaults.scan[0]},{defaults.scan[1]})",
    )
    parser.add_argument(
        "--grains", type=int, metavar="G", help=f"Voronoi grains (default: {defaults.grains})"
    )
    parser.add_argument(
        "--pattern",
        type=int,
        metavar="N",
        help=f"pattern size N x N px (default: {defaults.pattern})",
    )
    parser.add_argument(
        "--lattice", choices=list(LATTICE_SYMMETRY), help="reference lattice (default: square)"
    )
    parser.add_argument(
        "--max-strain",
        type=float,
        metavar="E",
        help=f"strain components within +-E (default: {defaults.max_strain})",
    )
    parser.add_argument(
        "--max-rot",
        type=float,
        metavar="DEG",
        help=f"rotations within +-DEG (default: {defaults.max_rot_deg:g})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of the grains, strains and rotations (default: 0)",
    )
    parser.add_argument(
        "--hard",
        action="store_true",
        help="the hardest settings: soft disk edges, intensity gradients in the disks, descan, "
        "elliptic distortion, a vacuum region",
    )
    noisy = parser.add_argument_group("noisy copies (the simulate-benchmark Prefect flow)")
    noisy.add_argument(
        "--levels",
        type=parse_levels,
        metavar="W,W,...",
        help="also write one noisy copy per background weight beside DEST (DEST-noiseXX.zarr); "
        "'paper' is 0,0.05,...,0.5,0.6,0.7",
    )
    noisy.add_argument(
        "--counts",
        type=float,
        default=1e5,
        metavar="N",
        help="electrons per pattern (default: 1e5)",
    )
    noisy.add_argument(
        "--noise-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the Poisson draws (default: 0)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run)
