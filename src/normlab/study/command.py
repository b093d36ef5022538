"""The ``normlab study`` and ``normlab report`` subcommands (argument parsing and output;
the work is in ``runner`` and ``report``)."""

from __future__ import annotations

import argparse
import errno
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .config import CellConfig
    from .store import Store
    from .tasks import Task

__all__ = ["add_subcommands", "cmd_study", "cmd_report"]



def report_dir(db: str, out: str | None) -> Path:
    """``--out``, or by default ``report/`` next to the database: two studies kept in two
    databases never overwrite each other's report."""
    return Path(out) if out else Path(db).parent / "report"


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
    from .store import DEFAULT_DB

    p = sub.add_parser(
        "study", help="train small models with each norm over batch sizes and seeds; store, tabulate, report",
        description="Which normalization for my network, at my batch size, at what cost. With no arguments: "
                    "MNIST-1D (generated locally), a 1-D CNN, the 13 classic norms that apply to a CNN, batch "
                    "sizes 8, 32, 128, 3 seeds, 3 epochs (about 2.5 minutes on 2 idle cores). Finished runs are "
                    "stored in a SQLite file and skipped when the command runs again.")
    p.add_argument("--task", default="mnist1d",
                   help="mnist1d (default), digits, transformer, fashion-mnist, sunspots, or pkg.module:factory "
                        "(a function returning a normlab.study.Task: your own data and model)")
    p.add_argument("--norms", help="comma-separated norm specs (e.g. bn,gn,gn:4,gn+ws,none; a bare gn takes the "
                                   "task's group count; NORM+ws also weight-standardizes the conv before each norm); "
                                   "default: every registered norm that applies to the task's network, and gn:G+ws "
                                   "for digits and fashion-mnist (mnist1d: the 13 classic norms)")
    p.add_argument("--batch-sizes", type=_int_list,
                   help="comma-separated batch sizes (default: the task's; 8,32,128 for mnist1d, else 2,4,8,16,32,64)")
    p.add_argument("--seeds", type=_positive, help="seeds per cell: 0..K-1 (default: the task's, 3 or more)")
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
    p.add_argument("--out", help="report folder (default: report/ next to --db)")
    p.add_argument("--workers", type=_positive, help="cells run in parallel processes (default: the cores)")
    p.add_argument("--backend", default="local",
                   help="where cells run: local (default: this machine) or ray (a Ray cluster; pip install "
                        "'normlab[ray]'; README \"Run a study on a cluster\")")
    p.add_argument("--address", help="the backend's cluster address (backends other than local); ray: auto "
                                     "(the cluster this machine joined with `ray start`) or ray://HOST:PORT; "
                                     "default: a Ray instance on this machine")
    p.add_argument("--cpus-per-cell", type=float, metavar="K",
                   help="ray: CPUs reserved for each process of a cell (default: --threads)")
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
    r.add_argument("--out", help="report folder (default: report/ next to --db); nothing is written outside it")
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
    from .backends import make_backend
    from .runner import available_cores, build_grid, resolve_norms, run_grid
    from .store import Store
    from .tasks import DataMissingError, get_task
    from .torchrun_cells import TorchrunBackend, follow, join_group, launched_by_torchrun

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
        batch_sizes = args.batch_sizes or list(task.default_batch_sizes)
        seeds = list(range(args.seeds or task.default_seeds))
        syncs = [False] if args.nproc == 1 else {"on": [True], "off": [False], "both": [True, False]}[args.sync]
        cells = [c for sync in syncs for c in build_grid(
            task.name, specs, batch_sizes, seeds, nproc=args.nproc, sync=sync,
            epochs=args.epochs or task.default_epochs, base_lr=args.lr or task.default_lr,
            base_batch=args.base_batch, lr_rule=args.lr_rule, width=args.width,
            eval_batch_size=args.eval_batch_size, data_dir=args.data_dir, threads=threads,
            train_subset=task.default_train_subset if args.train_subset is None else args.train_subset)]
        if args.cpus_per_cell is not None and args.backend == "local":
            raise ValueError("--cpus-per-cell applies to --backend ray (the local backend runs --workers processes)")
        extra = {} if args.cpus_per_cell is None else {"cpus_per_cell": args.cpus_per_cell}
        if launched_by_torchrun():  # the launch's processes train each cell together; rank 0 drives
            if join_group(args.nproc) != 0:
                return follow()
            backend = TorchrunBackend()
        else:
            backend = make_backend(args.backend, workers=min(workers, len(cells)), address=args.address, **extra)
    except DataMissingError as err:
        return _error("study", str(err))
    except (ValueError, ImportError) as err:
        return _error("study", str(err))
    for note in notes:
        print(f"normlab study: {note}", file=sys.stderr)

    with Store(args.db) as store, backend:
        store.open_for_writing()  # before training: a database that cannot be written fails now
        if args.fresh:
            store.delete(c.key() for c in cells)
        _store_plans(store, cells)
        outcome = run_grid(cells, store, progress=not args.quiet, backend=backend)
        _cost_pass(store, task, cells, quiet=args.quiet)
    keys = [c.key() for c in cells]
    _print_summary(args.db, keys)
    report = write_report_for(args.db, args.out, keys=None)
    wall = time.perf_counter() - t0
    print(f"{outcome.total} cells: {len(outcome.ran)} run, {outcome.skipped} already stored, "
          f"{len(outcome.failed)} failed; wall time {wall:.1f} s ({workers} workers x {threads} threads)")
    print(f"database: {args.db}")
    print(f"report:   {report}")
    for c, err in outcome.failed:
        print(f"FAILED {c.label()}: {err}", file=sys.stderr)
    return 1 if outcome.failed else 0


def _store_plans(store: "Store", cells: list["CellConfig"]) -> None:
    """Each study's planned grid (so that an unfinished one says so in its report)."""
    from .tables import put_note

    plans: dict[str, list] = {}
    for c in cells:
        plans.setdefault(c.study_key(), []).append(c)
    for key, cs in plans.items():
        put_note(store, key, "grid", {"norms": list(dict.fromkeys(c.norm for c in cs)),
                                      "batch_sizes": sorted({c.global_batch_size for c in cs}),
                                      "seeds": sorted({c.seed for c in cs})})


def _cost_pass(store: "Store", task: "Task", cells: list["CellConfig"], quiet: bool = False) -> None:
    """The cost pass of every study in ``cells`` that lacks one: all its norms timed in this
    process, alternating, one thread (``cost.measure_costs``)."""
    from .cost import measure_costs
    from .tables import read_costs, write_costs

    have = read_costs(store)
    studies: dict[str, list] = {}
    for c in cells:
        studies.setdefault(c.study_key(), []).append(c)
    for key, cs in studies.items():
        want = {(c.norm, c.global_batch_size) for c in cs}
        if want <= set(have.get(key, {})):
            continue
        c0, nproc = cs[0], cs[0].nproc
        if not quiet:
            print("normlab study: cost pass (every norm timed in this process, alternating, 1 thread) ...",
                  file=sys.stderr)
        try:
            costs = measure_costs(task, list(dict.fromkeys(c.norm for c in cs)), sorted({c.batch_size for c in cs}),
                                  width=c0.width, threads=1, data_dir=c0.data_dir, train_subset=c0.train_subset)
        except Exception as err:  # noqa: BLE001 (the report falls back to the training-time medians)
            print(f"normlab study: cost pass failed ({type(err).__name__}: {err}); the report uses the step "
                  "times measured during training", file=sys.stderr)
            continue
        write_costs(store, key, {(n, b * nproc): v for (n, b), v in costs.items()}, threads=1)


def _print_summary(db: str, keys: list[str]) -> None:
    from .report import (format_costs, format_table, grid_status, recommendations, sensitivity,
                         sensitivity_summary, table_caption)
    from .analysis import load_studies

    for st in load_studies(db, keys):
        warning = grid_status(st)
        if warning:
            print(warning)
        print(table_caption(st))
        print(format_table(st))
        print()
        print(f"Cost ({st.cost_source}):")
        print(format_costs(st))
        print()
        for r in recommendations(st):
            print(r)
        moves = sensitivity(st)
        if moves:
            print(f"\nWhen the batch size changes ({st.batch_sizes[-1]} -> {st.batch_sizes[0]}):")
            print("\n".join(moves))
            print(sensitivity_summary(st))
        print()


def write_report_for(db: str, out: str | None, keys: list[str] | None = None) -> Path:
    from .report import write_report

    return write_report(db, report_dir(db, out), keys)


@_clear_errors("report")
def cmd_report(args: argparse.Namespace) -> int:
    if not Path(args.db).is_file():
        return _error("report", f"no study database at {args.db} (run `normlab study --db {args.db}` first)")
    print(f"report: {write_report_for(args.db, args.out)}")
    return 0
