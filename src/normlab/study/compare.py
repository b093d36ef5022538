"""``normlab.compare``: the study on a user's own model and data.

The user's ``model_fn`` and data sets become a ``ModelTask`` (the same ``Task`` interface the
built-in tasks use), each run converts a fresh model to one norm spec (``normlab.convert``),
and the grid runs, is stored and reported exactly as ``normlab study``'s. Every check that
can fail is made before any training.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .tasks import Split, Task

if TYPE_CHECKING:
    from .._recognize import FoundNorm

__all__ = ["ModelTask", "compare", "model_fingerprint", "data_fingerprint"]


def _error_rate(outputs: Tensor, targets: Tensor) -> float:
    """Fraction of examples whose arg-max class is not the target."""
    return (outputs.argmax(1) != targets).double().mean().item()


def _name_of(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _norm_layers(model: nn.Module) -> list["FoundNorm"]:
    """The norm layers ``convert`` recognises in ``model`` (path, module, channel count and axis)."""
    from .._recognize import find_norms

    return [f for f in find_norms(model) if f.problem is None]


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the module tree (paths and classes) and every parameter and buffer's
    path, shape and dtype."""
    h = hashlib.sha256()
    for path, m in model.named_modules():
        h.update(f"{path}:{type(m).__module__}.{type(m).__qualname__};".encode())
    for path, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{path}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def data_fingerprint(*tensors: Tensor, sample: int = 256) -> str:
    """A hash of each tensor's shape and dtype and the bytes of ``sample`` evenly spaced rows."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        idx = torch.linspace(0, len(t) - 1, min(sample, len(t))).round().long().unique() if len(t) else []
        for i in idx:
            h.update(t[int(i)].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _materialize(data: Any, what: str) -> tuple[Tensor, Tensor]:
    """A data set of (input, target) items as two stacked tensors; clear errors otherwise."""
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"normlab.compare: {what} must be a torch.utils.data.Dataset of (input, target) items, "
                        f"got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError(f"normlab.compare: {what} is empty")
    xs, ys = [], []
    for i in range(n):
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = f"a {type(item).__name__}" + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else "")
            raise TypeError(f"normlab.compare: {what}[{i}] must be an (input, target) pair, got {got}")
        x, y = item
        if not isinstance(x, Tensor):
            raise TypeError(f"normlab.compare: {what}[{i}][0] (the input) must be a tensor, got {type(x).__name__}")
        xs.append(x)
        ys.append(torch.as_tensor(y))
    try:
        return torch.stack(xs).float(), torch.stack(ys)
    except RuntimeError as err:
        raise ValueError(f"normlab.compare: the items of {what} differ in shape ({err})") from None


class ModelTask(Task):
    """A user's model and data as a study task: the data sets are the split (the same for
    every seed; the seed moves the initialisation and the batch order), a run's model is
    ``convert(model_fn(), spec)`` (``"none"``: every norm replaced by the identity)."""

    kind = "user"

    def __init__(self, model_fn: Callable[[], nn.Module], x_train: Tensor, y_train: Tensor, x_val: Tensor,
                 y_val: Tensor, loss: Callable[[Tensor, Tensor], Tensor] | None = None,
                 metric: Callable[[Tensor, Tensor], float] | None = None, name: str | None = None) -> None:
        self.model_fn = model_fn
        self.data = (x_train, y_train, x_val, y_val)
        self.loss_fn = loss or nn.functional.cross_entropy
        self.metric_fn = metric or _error_rate
        self.metric = "error" if metric is None else getattr(metric, "__name__", "metric")
        self.name = name or f"compare:{getattr(model_fn, '__name__', type(model_fn).__name__)}"
        self.input_shape = tuple(x_train.shape[1:])
        self.groups = 1

    def split(self, seed: int, val_fraction: float = 0.2, val_max: int = 0, train_subset: int = 0,
              data_dir: str = "") -> Split:
        xt, yt, xv, yv = self.data
        if train_subset:
            xt, yt = xt[:train_subset], yt[:train_subset]
        return Split(xt, yt, xv, yv)

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        from ..convert import convert

        model = self.model_fn()
        try:
            return convert(model, norm_spec, copy_affine=False)
        except (ValueError, TypeError) as err:
            raise ValueError(f"norm {norm_spec!r} cannot be placed in {self.name}'s model: {err}") from None

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(out, y)

    def score(self, out: Tensor, y: Tensor, split: Split) -> float:
        return float(self.metric_fn(out, y))

    def fingerprint(self) -> str:
        torch.manual_seed(0)
        parts = [model_fingerprint(self.model_fn()), data_fingerprint(*self.data), _name_of(self.loss_fn),
                 _name_of(self.metric_fn), self.metric]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _check_model_fn(model_fn: Callable[[], nn.Module]) -> nn.Module:
    if not callable(model_fn):
        raise TypeError(f"normlab.compare: model_fn must be a function returning a fresh nn.Module, got "
                        f"{type(model_fn).__name__}")
    a, b = model_fn(), model_fn()
    for m in (a, b):
        if not isinstance(m, nn.Module):
            raise TypeError(f"normlab.compare: model_fn() must return an nn.Module, got {type(m).__name__}")
    if a is b:
        raise ValueError("normlab.compare: model_fn() returned the same model instance twice; it must build a "
                         "fresh model on every call (each run trains its own)")
    shared = {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}
    if shared:
        raise ValueError(f"normlab.compare: two models from model_fn() share {len(shared)} parameter tensors; it "
                         "must build fresh layers on every call")
    if not _norm_layers(a):
        raise ValueError("normlab.compare: no normalization layer found in the model from model_fn() (looked for "
                         "torch's BatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm and normlab's layers); "
                         "compare swaps the model's norm layers, so it needs at least one")
    return a


def _group_count(model: nn.Module) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides every norm layer's channel count."""
    counts = [f.num_features for f in _norm_layers(model)]
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in counts))


def compare(model_fn: Callable[[], nn.Module], train: Any, val: Any, *, norms: Sequence[str],
            batch_sizes: Sequence[int], seeds: int | Sequence[int] = 3, epochs: int = 3, lr: float | None = None,
            lr_rule: str = "linear", base_batch: int = 32, loss: Callable[[Tensor, Tensor], Tensor] | None = None,
            metric: Callable[[Tensor, Tensor], float] | None = None, db: str | Path | None = None,
            out: str | Path | None = None, workers: int = 1, progress: bool = True, backend: str = "local",
            address: str | None = None) -> list[dict[str, Any]]:
    """Which of ``norms`` suits this model and data, at each of ``batch_sizes``.

    ``model_fn()`` returns a fresh ``nn.Module`` holding norm layers of any kind ``convert``
    knows; each run converts it to one spec (``"none"`` removes them). ``train``/``val``:
    data sets of ``(input, target)`` (held in memory as tensors). ``loss`` (default
    cross-entropy) and ``metric(outputs, targets) -> float`` (lower is better; default the
    error rate) are stored by name. ``lr=None``: a short, deterministic learning-rate check on
    the first norm and batch size picks the base rate (printed and stored with the study).
    ``seeds``: a count (0..K-1) or the seed list. With ``db`` the runs are stored there and a
    rerun resumes (a cell's key includes fingerprints of the model and data, so a changed
    model or data set never reuses stale rows); the report goes to ``out`` (default: next to
    ``db``, in ``report/``). ``backend``/``address``: where cells run (``"local"``: this
    machine, ``workers`` processes). Returns one record per run, stored ones included, with
    the store's fields. Bad input raises before any training.
    """
    from .backends import make_backend
    from .config import LR_RULES

    # ------------------------------------------------------------------ checks, before any training
    norms = [str(n).strip() for n in norms]
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    batch_sizes = [int(b) for b in batch_sizes]
    for ok, msg in [(bool(norms), "norms is empty"), (bool(batch_sizes), "batch_sizes is empty"),
                    (all(b >= 1 for b in batch_sizes), f"batch sizes must be >= 1, got {batch_sizes}"),
                    (bool(seed_list), "seeds must be >= 1"), (epochs >= 1, f"epochs must be >= 1, got {epochs}"),
                    (lr is None or lr > 0, f"lr must be > 0, got {lr}"), (workers >= 1, "workers must be >= 1"),
                    (lr_rule in LR_RULES, f"lr_rule must be one of {LR_RULES}, got {lr_rule!r}")]:
        if not ok:
            raise ValueError(f"normlab.compare: {msg}")
    backend_obj = make_backend(backend, workers=workers, address=address)  # unknown backend: an error now
    threads_before = torch.get_num_threads()  # runs in this process set their own; the caller's comes back
    with torch.random.fork_rng(devices=[]):  # nor does the caller's random stream move
        try:
            return _compare(model_fn, train, val, norms, batch_sizes, seed_list, epochs, lr, lr_rule, base_batch,
                            loss, metric, db, out, workers, progress, backend, backend_obj)
        finally:
            backend_obj.close()
            torch.set_num_threads(threads_before)


def _compare(model_fn: Callable[[], nn.Module], train: Any, val: Any, norms: list[str], batch_sizes: list[int],
             seed_list: list[int], epochs: int, lr: float | None, lr_rule: str, base_batch: int,
             loss: Callable[[Tensor, Tensor], Tensor] | None, metric: Callable[[Tensor, Tensor], float] | None,
             db: str | Path | None, out: str | Path | None, workers: int, progress: bool, backend: str,
             backend_obj: Any) -> list[dict[str, Any]]:
    from .cost import measure_costs
    from .report import write_report
    from .runner import available_cores, build_grid, run_grid
    from .store import Store
    from .tables import put_note, read_costs, write_costs

    first = _check_model_fn(model_fn)
    x_train, y_train = _materialize(train, "train")
    x_val, y_val = _materialize(val, "val")
    task = ModelTask(model_fn, x_train, y_train, x_val, y_val, loss, metric)
    task.groups = _group_count(first)
    norms = list(dict.fromkeys(task.full_spec(n) for n in norms))
    too_big = [b for b in batch_sizes if b > len(x_train)]
    if too_big:
        raise ValueError(f"normlab.compare: batch size {max(too_big)} is larger than the training set "
                         f"({len(x_train)} examples)")
    for spec in norms:
        _probe(task, spec, x_train[:2], y_train[:2])
    if workers > 1 or backend != "local":
        try:
            pickle.dumps(task)
        except Exception as err:  # noqa: BLE001 (any pickling failure means the same thing)
            raise ValueError("normlab.compare: running cells in other processes needs a model_fn, loss and "
                             "metric that pickle can send (module-level functions or classes, not lambdas or "
                             f"local functions): {type(err).__name__}: {err}") from None
    threads = max(1, available_cores() // workers)
    fields: dict[str, Any] = dict(epochs=epochs, base_batch=base_batch, lr_rule=lr_rule,
                                  threads=threads, fingerprint=task.fingerprint())

    # ------------------------------------------------------------------ the learning rate
    lr_note = None
    if lr is None:
        lr, lr_note = lr_range_check(task, norms[0], batch_sizes[0], seed_list[0], fields)
        if progress:
            print(f"normlab.compare: {lr_note}", file=sys.stderr)
    cells = build_grid(task.name, norms, batch_sizes, seed_list, base_lr=lr, task_obj=task, **fields)

    # ------------------------------------------------------------------ the grid, the cost pass
    tmp = None if db is not None else tempfile.TemporaryDirectory(prefix="normlab-compare-")
    db_path = Path(db) if db is not None else Path(tmp.name) / "results.sqlite"  # type: ignore[union-attr]
    try:
        with Store(db_path) as store:
            study = cells[0].study_key()
            put_note(store, study, "grid", {"norms": norms, "batch_sizes": batch_sizes, "seeds": seed_list})
            if lr_note:
                put_note(store, study, "learning rate", lr_note)
            run_grid(cells, store, workers=workers, progress=progress, backend=backend_obj, task=task)
            if set(read_costs(store).get(study, {})) != {(n, b) for n in norms for b in batch_sizes}:
                write_costs(store, study, measure_costs(task, norms, batch_sizes, threads=1), threads=1)
            records = store.rows([c.key() for c in cells])
        if out is not None or db is not None:
            report = write_report(db_path, Path(out) if out is not None else db_path.parent / "report",
                                  [c.key() for c in cells])
            if progress:
                print(f"normlab.compare: report {report}", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return records


def _probe(task: ModelTask, spec: str, x: Tensor, y: Tensor) -> None:
    """Build the model with ``spec`` and run a training step's forward, loss and backward and
    an eval forward on two examples; errors name the spec."""
    from ..registry import make_norm

    for f in _norm_layers(task.model_fn()):
        path, layer, channels, channel_dim = f.path, f.module, f.num_features, f.channel_dim
        try:
            make_norm(spec, channels, channel_dim=channel_dim)
        except Exception as err:  # noqa: BLE001 (re-raised naming the layer)
            raise ValueError(f"norm {spec!r} cannot be placed at {path} ({type(layer).__name__}, {channels} "
                             f"channels): {err}") from None
    try:
        model = task.build_model(spec)
        model.train()
        task.loss(model(x), y).backward()
        with torch.no_grad():
            model.eval()(x)
    except Exception as err:  # noqa: BLE001 (re-raised with the spec named)
        msg = str(err)
        raise ValueError(msg if msg.startswith("norm ") else f"norm {spec!r} cannot be placed in "
                         f"{task.name}'s model: {type(err).__name__}: {msg}") from None


LR_CANDIDATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def lr_range_check(task: Task, norm: str, batch_size: int, seed: int, fields: dict[str, Any],
                   candidates: Iterable[float] = LR_CANDIDATES, max_steps: int = 60) -> tuple[float, str]:
    """Train ``norm`` at ``batch_size`` (seed ``seed``) briefly at each candidate base rate
    (constant schedule, the same batches) and pick the one with the lowest mean training loss
    over the last quarter of the steps; diverged candidates are out. Deterministic given the
    seed and thread count. Returns (base lr, the choice and its reasons in words)."""
    from .config import CellConfig
    from .train import run_cell

    n = len(task.split(seed).x_train)
    steps = max(1, min(max_steps, n // batch_size))
    losses: dict[float, float | None] = {}
    for base_lr in candidates:
        cfg = CellConfig(task=task.name, norm=norm, batch_size=batch_size, seed=seed, base_lr=base_lr, schedule="constant",
                         train_subset=steps * batch_size, curve_points=4,
                         **{**fields, "epochs": 1})
        r = run_cell(cfg, task)
        tail = r.curve[-1][1] if r.status == "ok" and r.curve and r.curve[-1][1] is not None else None
        losses[base_lr] = tail
    ok = {k: v for k, v in losses.items() if v is not None}
    if not ok:
        raise ValueError(f"normlab.compare: the learning-rate check diverged at every candidate "
                         f"{list(losses)}; pass lr= explicitly")
    best = min(ok, key=lambda k: (ok[k], k))
    table = ", ".join(f"{k:g}: {'diverged' if v is None else f'{v:.3g}'}" for k, v in losses.items())
    text = (f"learning-rate check on {norm} at batch {batch_size}, seed {seed}, {steps} steps at a constant rate "
            f"per candidate; mean training loss over the last quarter by base rate (at batch "
            f"{fields['base_batch']}, {fields['lr_rule']} scaling): {table}. Chose base lr {best:g}: the lowest loss.")
    return best, text
