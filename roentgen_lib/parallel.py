"""Independent jobs in worker processes, each with an equal share of this process's CPU threads.

The demo's models are small: on 2 cores, two fine-tunes side by side with one thread each train 1.4x
faster than one after the other with two threads each (a second thread per operation pays little on
16 x 16 latents). 03 trains its runs this way; 05 draws its models' images and trains its
classifiers this way. `processes=1` runs the jobs one after another in one worker with every thread.

Processes are spawned (a fork would copy this process's threads and locks), so a script that calls
`run_jobs` needs Python's `if __name__ == "__main__":` guard; a notebook does not.

Usage::

    results = run_jobs(finetune, {"unet": (cfg_unet,), "both": (cfg_both,)}, processes=2)
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

LIBRARY = str(Path(__file__).parent)


def run_jobs(function: Callable, jobs: dict[str, tuple], processes: int, cost: Callable[[str], float] | None = None,
             follow: Callable[[], None] | None = None, desc: str | None = None) -> dict[str, Any]:
    """`function(*jobs[name])` for every job, `processes` at a time; the results in the order of `jobs`.

    Jobs with the largest `cost` start first, so the processes end together. `follow` is called about
    once a second while jobs run (to update progress bars); `desc` shows a bar of finished jobs.
    Warnings the library raises in a job are raised here again, prefixed by the job's name. When a job
    fails, jobs not yet started are cancelled and its error is raised once the running ones end.
    """
    threads = max(1, torch.get_num_threads() // processes)
    order = sorted(jobs, key=lambda name: -cost(name)) if cost else list(jobs)
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(call_with_threads, function, threads, jobs[name]) for name in order}
        wait_for(futures, follow, desc)
    failed = [f for f in futures.values() if not f.cancelled() and f.exception() is not None]
    if failed:
        failed[0].result()
    results = {}
    for name in jobs:
        results[name], messages = futures[name].result()
        for message in messages:
            warnings.warn(f"{name}: {message}", stacklevel=2)
    return results


def call_with_threads(function: Callable, threads: int, args: tuple) -> tuple[Any, list[str]]:
    """`function(*args)` with `threads` CPU threads, and the messages of the warnings the library raised."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", module="roentgen_lib")
        result = function(*args)
    return result, [str(w.message) for w in caught if w.filename.startswith(LIBRARY)]


def wait_for(futures: dict[str, Future], follow: Callable[[], None] | None, desc: str | None) -> None:
    """Wait until every job has ended, or one has failed (then cancel those not started)."""
    bar = tqdm(total=len(futures), desc=desc, unit="job", disable=desc is None)
    pending = set(futures.values())
    while pending:
        done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
        bar.update(len(done))
        if follow is not None:
            follow()
        if any(not f.cancelled() and f.exception() is not None for f in done):
            for future in pending:
                future.cancel()
            break
    bar.close()
