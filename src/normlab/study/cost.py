"""The cost pass: after training, every norm's model timed in this one process, alternating
between norms round by round, at a fixed thread count, so that load on the machine while the
grid ran (other workers, other users) cannot decide which norm looks cheapest. Also the
bytes autograd saves for backward, per sample, at each batch size.

A training step here is the study's step: forward, loss, backward, SGD update, on a fixed
batch of the task's training split; the time of a norm at a batch size is the median over
rounds of the mean over ``steps`` consecutive steps.
"""

from __future__ import annotations

import statistics
import time

import torch

from .tasks import Task
from .train import saved_bytes_per_sample

__all__ = ["measure_costs"]


def measure_costs(task: Task, norms: list[str], batch_sizes: list[int], width: int = 16, threads: int = 1,
                  rounds: int = 5, steps: int = 3, seed: int = 0, data_dir: str = "", train_subset: int = 0
                  ) -> dict[tuple[str, int], tuple[float, float]]:
    """``(norm, batch size) -> (seconds per training step, saved bytes per sample)``."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = task.split(seed, 0.2, 2000, train_subset, data_dir)
        out: dict[tuple[str, int], tuple[float, float]] = {}
        for bs in batch_sizes:
            xb, yb = split.x_train[:bs].clone(), split.y_train[:bs].clone()
            runs = []
            for spec in norms:
                torch.manual_seed(seed)
                model = task.build_model(spec, width).train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
                saved = saved_bytes_per_sample(model, task.loss, xb, yb)
                runs.append((spec, model, opt, saved, []))

            def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
                opt.zero_grad(set_to_none=True)
                task.loss(model(xb), yb).backward()
                opt.step()

            for _, model, opt, _, _ in runs:  # warm-up: first-call costs (kernel loading, allocation)
                step(model, opt)
            for r in range(rounds):
                for spec, model, opt, _, times in (runs if r % 2 == 0 else runs[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        step(model, opt)
                    times.append((time.perf_counter() - t0) / steps)
            for spec, _, _, saved, times in runs:
                out[(spec, bs)] = (statistics.median(times), saved)
        return out
    finally:
        torch.set_num_threads(old_threads)
