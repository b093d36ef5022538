"""The ``normlab study`` and ``normlab report`` subcommands (argument parsing and output;
the work is in ``runner`` and ``report``)."""

from __future__ import annotations

import argparse
import errno
import functools
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["add_subcommands", "cmd_study", "cmd_report"]

DEFAULT_OUT = "normlab-results/report"


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    from .runner import DEFAULT_BATCH_SIZES
    from .store import DEFAULT_DB

    p = sub.add_parser(
        "study", help="train small models with each norm over batch sizes and seeds; store, tabulate, report",
        description="Which normalization for my network, at my batch size, at what cost. With no arguments: "
                    "the 8x8 digits set shipped in scikit-learn, a small CNN, every registered norm that "
                    "applies to a CNN, batch sizes 2..64, 2 seeds. Finished runs are stored in a SQLite file "
                    "and skipped when the command runs again.")
    p.add_argument("--task", default="digits", help="digits (default), fashion-mnist, mnist1d or sunspots")
    p.add_argument("--norms", help="comma-separated norm specs (e.g. bn,gn:4,none); default: every registered "
                                   "norm that applies to the task's network")
    p.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES),
                   help="comma-separated batch sizes (default 2,4,8,16,32,64)")
    p.add_argument("--seeds", type=_positive, default=2, help="seeds per cell: 0..K-1 (default 2)")
    p.add_argument("--epochs", type=_positive, help="epochs at every batch size (default: the task's)")
    p.add_argument("--lr", type=float, help="base learning rate at --base-batch (default: the task's)")
    p.add_argument("--base-batch", type=_positive, default=32, help="batch size --lr refers to (default 32)")
    p.add_argument("--lr-rule", choices=["linear", "sqrt", "none"], default="linear",
                   help="how the learning rate scales with the batch size (default linear)")
    p.add_argument("--width", type=_positive, default=16, help="channels of the first conv layer (default 16)")
    p.add_argument("--eval-batch-size", type=_positive, default=256)
    p.add_argument("--train-subset", type=int,
                   help="keep only N training examples (0: all; default: the task's, all but for fashion-mnist)")
    p.add_argument("--data-dir", default="", help="folder of the data set's files (fashion-mnist's IDX files)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    p.add_argument("--workers", type=_positive, help="cells run in parallel processes (default: the cores)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch threads per worker (default 1: small models gain nothing from more, and "
                        "threads that outnumber free cores slow down many times over)")
    p.add_argument("--nproc", type=_positive, default=1,
                   help="run each cell as P data-parallel processes (gloo, DDP); --batch-sizes are then per "
                        "process and the global batch is P times larger (default 1)")
    p.add_argument("--sync", choices=["on", "off", "both"], default="both",
                   help="with --nproc > 1: batch statistics synchronized over the processes, local, or both "
                        "(default both, to compare them at the same per-process batch)")
    p.add_argument("--fresh", action="store_true", help="forget this grid's stored runs and run them again")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_study)

    r = sub.add_parser("report", help="rebuild the study report (report.md and figures) from a database alone")
    r.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    r.set_defaults(func=cmd_report)


def _error(cmd: str, msg: str) -> int:
    print(f"normlab {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _clear_errors(cmd: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """A database problem (``StoreError``) or a full, read-only or forbidden disk ends the
    command with one ``normlab CMD: error: ...`` line naming the file, not a traceback."""
    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            from .store import StoreError

            try:
                return fn(args)
            except StoreError as err:
                return _error(cmd, str(err))
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                return _error(cmd, f"cannot write {err.filename or 'a file'}: {err.strerror}; "
                                   f"free some space or choose a writable folder")
        return run
    return wrap


@_clear_errors("study")
def cmd_study(args: argparse.Namespace) -> int:
    from .report import format_table, load_studies, table_caption, write_report
    from .runner import available_cores, build_grid, resolve_norms, run_grid
    from .store import Store
    from .tasks import DataMissingError, get_task

    t0 = time.perf_counter()
    try:
        task = get_task(args.task)
        norms = [s.strip() for s in args.norms.split(",") if s.strip()] if args.norms else None
        specs, notes = resolve_norms(task, norms, args.width)
        if not specs:
            return _error("study", f"no norm applies to task {task.name!r}")
        cores = available_cores()
        workers = args.workers or max(1, cores // args.nproc)
        threads = args.threads or max(1, cores // (workers * args.nproc))
        syncs = [False] if args.nproc == 1 else {"on": [True], "off": [False], "both": [True, False]}[args.sync]
        cells = [c for sync in syncs for c in build_grid(
            task.name, specs, args.batch_sizes, list(range(args.seeds)), nproc=args.nproc, sync=sync,
            epochs=args.epochs or task.default_epochs, base_lr=args.lr or task.default_lr,
            base_batch=args.base_batch, lr_rule=args.lr_rule, width=args.width,
            eval_batch_size=args.eval_batch_size, data_dir=args.data_dir, threads=threads,
            train_subset=task.default_train_subset if args.train_subset is None else args.train_subset)]
    except DataMissingError as err:
        return _error("study", str(err))
    except (ValueError, ImportError) as err:
        return _error("study", str(err))
    for note in notes:
        print(f"normlab study: {note}", file=sys.stderr)

    with Store(args.db) as store:
        store.open_for_writing()  # before training: a database that cannot be written fails now
        if args.fresh:
            store.delete(c.key() for c in cells)
        outcome = run_grid(cells, store, workers=min(workers, len(cells)), progress=not args.quiet)
    keys = [c.key() for c in cells]
    for st in load_studies(args.db, keys):
        print(table_caption(st))
        print(format_table(st))
        print()
    report = write_report(args.db, args.out)
    wall = time.perf_counter() - t0
    print(f"{outcome.total} cells: {len(outcome.ran)} run, {outcome.skipped} already stored, "
          f"{len(outcome.failed)} failed; wall time {wall:.1f} s ({workers} workers x {threads} threads)")
    print(f"database: {args.db}")
    print(f"report:   {report}")
    for c, err in outcome.failed:
        print(f"FAILED {c.label()}: {err}", file=sys.stderr)
    return 1 if outcome.failed else 0


@_clear_errors("report")
def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if not Path(args.db).is_file():
        return _error("report", f"no study database at {args.db} (run `normlab study --db {args.db}` first)")
    print(f"report: {write_report(args.db, args.out)}")
    return 0
