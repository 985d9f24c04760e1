"""Independent jobs in worker processes, each with an equal share of this process's CPU threads, or its own GPU.

The demo's models are small: on 2 cores, two fine-tunes side by side with one thread each train 1.4x
faster than one after the other with two threads each (a second thread per operation pays little on
16 x 16 latents). 03 trains its runs this way; 05 draws its models' images and trains its
classifiers this way. `processes=1` runs the jobs one after another in one worker with every thread.
When CUDA devices are present, the job in slot k of the `processes` running at once is placed on GPU
k mod the device count: 8 processes on 8 GPUs train 03's variants, or draw a model's images, side by
side, one per GPU.

Processes are spawned (a fork would copy this process's threads and locks), so a script that calls
`run_jobs` needs Python's `if __name__ == "__main__":` guard; a notebook does not.

Usage::

    results = run_jobs(finetune, {"unet": (cfg_unet,), "both": (cfg_both,)}, processes=2)
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

LIBRARY = str(Path(__file__).parent)
_slot = 0  # the slot of the job running in this worker process (see `current_slot`)


def run_jobs(function: Callable, jobs: dict[str, tuple], processes: int, cost: dict[str, float] | None = None,
             follow: Callable[[], None] | None = None, desc: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """`function(*jobs[name])` for every job, `processes` at a time; the results in the order of `jobs`.

    `function` must be importable by name (a module-level function). Jobs with the largest `cost`
    start first, so the processes end together. Each running job holds a slot, and with it a GPU where
    there are some. `follow` is called about once a second while jobs
    run (to update progress bars); `desc` shows a bar of finished jobs. Warnings this library raises
    in a job are raised here again, prefixed by the job's name. When a job fails, or this process is
    interrupted, no further job starts, and the error is raised once the running ones end. `fresh`
    gives every job a new process, which returns all its memory when the job ends (large training runs).
    """
    processes = max(1, min(processes, len(jobs)))
    threads = max(1, torch.get_num_threads() // processes)
    order = sorted(jobs, key=cost.__getitem__, reverse=True) if cost else list(jobs)
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, max_tasks_per_child=1 if fresh else None) as pool:
        ended = run_in_turn(pool, function, threads, {name: jobs[name] for name in order}, processes, follow, desc)
    for future in ended.values():
        if future.exception() is not None:
            future.result()
    results = {}
    for name in jobs:
        results[name], caught = ended[name].result()
        for category, message in caught:
            warnings.warn(f"{name}: {message}", category, stacklevel=2)
    return results


def exit_with_parent() -> None:
    """Worker initializer: end this worker as soon as the process that started it ends.

    A notebook kernel or runner that is killed (rather than interrupted) cannot stop its pool, and
    its workers would train on as orphans, writing into the same run folders as the next attempt.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=exit_when_ready, args=(parent.sentinel,), daemon=True).start()


def exit_when_ready(sentinel: int) -> None:
    """Block until `sentinel` (the parent's) is ready, that is until the parent has ended; then exit at once."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def call_with_threads(function: Callable, threads: int, slot: int, args: tuple) -> tuple[Any, list[tuple[type[Warning], str]]]:
    """`function(*args)` with `threads` CPU threads on the slot's GPU (if any), and the warnings this library
    raised (category, message)."""
    global _slot
    _slot = slot
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(slot % torch.cuda.device_count())
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", module="roentgen_lib")
        result = function(*args)
    return result, [(w.category, str(w.message)) for w in caught if w.filename.startswith(LIBRARY)]


def current_slot() -> int:
    """The slot (0 .. processes-1) of the job running in this process; its GPU is slot mod the device count."""
    return _slot


def run_in_turn(pool: ProcessPoolExecutor, function: Callable, threads: int, jobs: dict[str, tuple], processes: int,
                follow: Callable[[], None] | None, desc: str | None) -> dict[str, Future]:
    """Submit the jobs in order, never more than `processes` at once, until all have ended or one failed.

    Submitting only as processes free up (the pool would queue ahead) is what lets a failure or an
    interrupt keep the remaining jobs from starting. Returns the futures of the jobs that ended.
    """
    waiting, running, ended, free_slots = list(jobs), {}, {}, list(range(processes))
    with tqdm(total=len(jobs), desc=desc, unit="job", disable=desc is None) as bar:
        while waiting or running:
            while waiting and len(running) < processes:
                name, slot = waiting.pop(0), free_slots.pop(0)
                running[pool.submit(call_with_threads, function, threads, slot, jobs[name])] = name, slot
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                name, slot = running.pop(future)
                ended[name] = future
                free_slots.append(slot)
                if future.exception() is not None:
                    waiting.clear()
            bar.update(len(done))
            if follow is not None:
                follow()
    return ended
