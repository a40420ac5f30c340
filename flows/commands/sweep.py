"""``stemflow sweep DEST``: the accuracy benchmark as the noise-sweep Prefect flow.

One simulated scan with its truth, one noisy copy per background level (the paper's model),
CC-ST-AE and py4DSTEM on every level in parallel on a Dask cluster, each scored against the
truth; the table of errors, beside the paper's Figure 3, is printed and written beside DEST.
"""

from __future__ import annotations

import argparse

from stemlib.simulate import LATTICE_SYMMETRY, SimulationConfig

from .run import add_dask_argument, add_method_arguments, flow_run, method_options
from .simulate import config_from_args, levels_from_args, parse_levels

__all__ = ["register", "simulation_from_args"]


def _scan_size(text: str) -> tuple[int, int]:
    """``"32"`` (a square scan) or ``"RX,RY"``."""
    try:
        sizes = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or RX,RY like 32 or 32,48, got {text!r}")
    return (sizes[0], sizes[-1])


def simulation_from_args(args: argparse.Namespace) -> SimulationConfig:
    """The sweep's simulation: :data:`flows.noise_sweep.SWEEP_SIMULATION` with the flags given
    (on :meth:`SimulationConfig.hard` with ``--hard``)."""
    from flows.noise_sweep import SWEEP_SIMULATION

    return config_from_args(args, base=SWEEP_SIMULATION)


def _run(args: argparse.Namespace) -> int:
    from flows.noise_sweep import check_sweep, noise_sweep, sweep_table, table_url
    from flows.runners import dask_runner

    simulation = simulation_from_args(args)
    noise = levels_from_args(args)
    # A mistake is refused here, as one sentence, before Prefect or Dask start.
    check_sweep(
        args.dest,
        levels=list(dict.fromkeys(noise.levels)),
        reference=args.reference,
        simulation=simulation,
    )
    with flow_run(args.dask_address):
        rows = noise_sweep.with_options(task_runner=dask_runner(args.dask_address))(
            dest=args.dest,
            simulation=simulation,
            noise=noise,
            reference=args.reference,
            device=args.device,
            workdir=args.workdir,
            **method_options(args),
        )
    print(f"\n{sweep_table(rows)}\n")
    print(f"tables: {table_url(args.dest, 'md')}  {table_url(args.dest, 'json')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "sweep",
        help="the accuracy benchmark: both methods' errors against the truth per noise level",
        description="Run the noise-sweep Prefect flow: simulate a scan of Voronoi grains with its "
        "truth and one noisy copy per background level (the CC-ST-AE paper's model), map strain "
        "with CC-ST-AE and py4DSTEM on every level in parallel against the truth's reference "
        "grain, and print each method's mean absolute error beside the paper's Figure 3. The "
        "table is also written beside DEST (DEST-sweep.md, DEST-sweep.json); a rerun skips "
        "finished levels.",
    )
    parser.add_argument(
        "dest", metavar="DEST", help="clean scan store to write: path or URL (s3://bucket/key)"
    )
    sim = parser.add_argument_group("simulation (default: 32 x 32 positions, 128 px, 8 grains)")
    sim.add_argument("--scan", type=_scan_size, metavar="N|RX,RY", help="probe positions")
    sim.add_argument("--pattern", type=int, metavar="N", help="pattern size N x N px")
    sim.add_argument("--grains", type=int, metavar="G", help="Voronoi grains")
    sim.add_argument("--lattice", choices=list(LATTICE_SYMMETRY), help="reference lattice")
    sim.add_argument(
        "--max-strain", type=float, metavar="E", help="strain components within +-E (0.02)"
    )
    sim.add_argument("--max-rot", type=float, metavar="DEG", help="rotations within +-DEG (180)")
    sim.add_argument("--seed", type=int, metavar="S", help="seed of the grains (default: 0)")
    sim.add_argument("--hard", action="store_true", help="the simulator's hardest settings")
    noisy = parser.add_argument_group("noise")
    noisy.add_argument(
        "--levels",
        type=parse_levels,
        default="paper",
        metavar="W,W,...",
        help="background weights, e.g. 0,0.25,0.5 (default: paper, 0,0.05,...,0.5,0.6,0.7)",
    )
    noisy.add_argument(
        "--counts", type=float, default=1e5, metavar="N", help="electrons per pattern (1e5)"
    )
    noisy.add_argument(
        "--noise-seed", type=int, default=0, metavar="S", help="seed of the Poisson draws (0)"
    )
    strain = parser.add_argument_group("strain")
    add_method_arguments(strain)
    strain.add_argument(
        "--reference",
        default="truth",
        metavar="truth|auto|RX0:RX1,RY0:RY1|mask.npy",
        help="reference region (default: truth, the simulated reference grain)",
    )
    strain.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where CC-ST-AE trains"
    )
    where = parser.add_argument_group("where")
    where.add_argument("--workdir", help="strain maps and checkpoints (default: beside DEST)")
    add_dask_argument(where)
    parser.set_defaults(run=_run)
