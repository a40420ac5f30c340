"""``stemflow noise SOURCE DEST --background W``: the paper's noise model on a scan store or a
raw scan."""

from __future__ import annotations

import argparse
import time

import numpy as np

from stemlib.io.storage import redact
from stemlib.noise import PAPER_COUNTS, noise_store

from .ingest import add_source_arguments, options_from_args

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from tqdm.dask import TqdmCallback

    start = time.perf_counter()
    with TqdmCallback(desc="noise", unit="block", disable=args.quiet or None):
        result = noise_store(
            args.source,
            args.dest,
            background=args.background,
            counts=args.counts,
            seed=args.seed,
            model=args.model,
            read=options_from_args(args),
        )
    seconds = time.perf_counter() - start
    patterns = result.shape[0] * result.shape[1]
    url = redact(result.url)
    if result.status == "skipped":
        print(
            f"{url} already holds this noisy copy (same source content, model, w, N and seed): "
            f"skipped.\n  open it with:  xr.open_zarr({url!r})"
        )
        return 0
    what = (
        "the clean patterns (w = 0: no Poisson step)"
        if args.model == "background" and args.background == 0
        else f"{np.dtype(result.dtype)} counts, N = {args.counts:g}, seed {args.seed}"
    )
    print(
        f"wrote {url}: {args.model} model, w = {args.background:g}: {what} "
        f"({patterns / seconds:.0f} patterns/s)\n  open it with:  xr.open_zarr({url!r})"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "noise",
        help="add the CC-ST-AE paper's background + Poisson noise to a scan",
        description="Write a noisy copy of a scan store or a raw scan (read as `stemflow ingest` "
        "reads it) as a scan store: counts ~ Poisson(N ((1 - w) P + w B)) with B "
        "the paper's Lorentzian background (CONVENTIONS.md section 3), or pure shot noise with "
        "--model dose. Counts are stored as integers, the paper's scale 1/N * 1e5/4 as the "
        "attribute paper_scale; the source's truth is copied.",
    )
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="scan store, or raw scan (any supported format), to read: path or URL",
    )
    parser.add_argument("dest", metavar="DEST", help="scan store to write: path or URL")
    parser.add_argument(
        "--background",
        type=float,
        required=True,
        metavar="W",
        help="background weight in [0, 1] (0.5 = 50 %%)",
    )
    parser.add_argument(
        "--counts",
        type=float,
        default=PAPER_COUNTS,
        metavar="N",
        help="electrons per pattern (default: 1e5)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the Poisson draws (default: 0)"
    )
    parser.add_argument(
        "--model",
        choices=["background", "dose"],
        default="background",
        help="background (the paper) or dose (shot noise only)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_source_arguments(parser, stores=False)  # for a raw SOURCE
    parser.set_defaults(run=_run)
