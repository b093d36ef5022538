"""The ``normlab reproduce`` subcommand: the papers' claims rerun as studies, judged by a
rule fixed in advance (see ``verdict``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any

from ..command import _positive  # the study command's argument type

__all__ = ["add_subcommand", "cmd_reproduce", "reproduce", "DEFAULT_DB", "DEFAULT_OUT"]

DEFAULT_DB = "normlab-results/reproduce.sqlite"
DEFAULT_OUT = "normlab-results/reproduce"


def add_subcommand(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from .claims import FULL_SEEDS, QUICK_SEEDS, claim_ids

    p = sub.add_parser(
        "reproduce", help="rerun the normalization papers' claims as small studies; verdicts by a fixed rule",
        description="Rerun each claim of the normalization literature as a small study on real data on this "
                    "machine (the study runner and SQLite store: finished cells are skipped when rerun) and "
                    "judge it by one rule fixed in advance: d = mean paired difference over seeds in the "
                    "paper's direction, reproduced if d > 2 se, contradicted if d < -2 se, else inconclusive "
                    "(\"within 2 se\" claims: reproduced if |d| <= 2 se). Writes reproduce.md, reproduce.json "
                    f"and a figure per claim. Claims: {', '.join(claim_ids())}.")
    p.add_argument("--claims", help="comma-separated claim ids (default: all)")
    p.add_argument("--quick", action="store_true", help=f"less data and fewer epochs, {QUICK_SEEDS} seeds by default "
                                                        "(a smoke run: its verdicts are weaker)")
    p.add_argument("--seeds", type=_positive, help=f"seeds 0..K-1 per arm (default {FULL_SEEDS}, --quick {QUICK_SEEDS})")
    p.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--workers", type=_positive, help="cells run in parallel processes (default: the cores)")
    p.add_argument("--backend", default="local", help="where cells run: local (default) or ray (needs the study's "
                                                       "backend interface and ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)


def _make_backend(name: str, workers: int) -> Any:
    """None for local (the runner's own processes); the study's backend for anything else."""
    if name == "local":
        return None
    try:
        from ..backends import make_backend  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ValueError(f"--backend {name!r}: this normlab has no study backend interface "
                         f"(normlab.study.backends); only 'local' is available") from None
    return make_backend(name, workers=workers)


def reproduce(claims: list[str] | None = None, quick: bool = False, seeds: int | None = None,
              db: str = DEFAULT_DB, out: str = DEFAULT_OUT, workers: int | None = None, backend: str = "local",
              progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Run the claims and write the report; returns (reproduce.json's content, the .md path)."""
    from ..runner import available_cores, run_grid
    from ..store import Store
    from .claims import FULL_SEEDS, QUICK_SEEDS, get_claims
    from .report import write_outputs
    from .run import evaluate_claims, run_claims

    t0 = time.perf_counter()
    chosen = get_claims(claims)
    seed_list = list(range(seeds or (QUICK_SEEDS if quick else FULL_SEEDS)))
    workers = workers or available_cores()
    with contextlib.ExitStack() as stack, Store(db) as store:
        runner: Any = None
        engine = _make_backend(backend, workers)
        if engine is not None:
            engine = stack.enter_context(engine) if hasattr(engine, "__enter__") else engine
            runner = lambda cells, st, **kw: run_grid(cells, st, backend=engine, **kw)  # noqa: E731
        skipped = run_claims(chosen, seed_list, quick, store, workers=workers, progress=progress, backend=runner)
        result = evaluate_claims(chosen, seed_list, quick, store, skipped)
    wall = time.perf_counter() - t0
    result["wall_s"] = round(wall, 1)
    md = write_outputs(result, out, wall)
    return result, md


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .report import summary_table

    ids = [c.strip() for c in args.claims.split(",") if c.strip()] if args.claims else None
    try:
        result, md = reproduce(ids, args.quick, args.seeds, args.db, args.out, args.workers, args.backend,
                               progress=not args.quiet)
    except ValueError as err:
        print(f"normlab reproduce: error: {err}", file=sys.stderr)
        return 2
    print(summary_table(result))
    print(f"\nwall time {result['wall_s']:.0f} s; database: {args.db}; report: {md}")
    return 0
