"""Run prep tasks in parallel: local processes by default, a Ray cluster when given an address."""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Sequence

from tqdm import tqdm


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def run_parallel(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    workers: int | None = None,
    ray_address: str | None = None,
    desc: str = "",
    progress: bool = True,
) -> list[Any]:
    """``[fn(*job) for job in jobs]`` in parallel, results in job order, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="task", disable=not progress, leave=False)
    try:
        if ray_address:
            return _run_ray(fn, jobs, ray_address, bar)
        workers = min(workers or default_workers(), len(jobs))
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(fn(*job))
                bar.update()
            return results
        results: list[Any] = [None] * len(jobs)
        # spawn: the parent may hold torch/OpenMP threads that do not survive fork
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *job): k for k, job in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        return results
    finally:
        bar.close()


def _run_ray(fn: Callable[..., Any], jobs: Sequence[tuple], address: str, bar: tqdm) -> list[Any]:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(fn)
    refs = [remote.remote(*job) for job in jobs]
    position = {ref: k for k, ref in enumerate(refs)}
    results: list[Any] = [None] * len(jobs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            results[position[ref]] = ray.get(ref)
            bar.update()
    return results
