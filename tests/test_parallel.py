"""Jobs in worker processes: their order, their share of threads, failures and warnings."""

import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from roentgen_lib import parallel


def started_at(name: str) -> tuple[str, float, int]:
    """A job that reports when it started (CLOCK_MONOTONIC is shared by processes) and its threads."""
    start = time.monotonic()
    time.sleep(0.2)
    return name, start, torch.get_num_threads()


def fail_or_mark(name: str, folder: str) -> str:
    """A job that fails when named "fail" and otherwise leaves a file behind."""
    if name == "fail":
        raise RuntimeError("job failed on purpose")
    (Path(folder) / name).write_text("ran")
    return name


def test_costliest_jobs_start_first_and_results_keep_the_given_order():
    jobs = {name: (name,) for name in ("small", "large", "medium")}
    results = parallel.run_jobs(started_at, jobs, processes=1, cost={"small": 1, "large": 9, "medium": 5})
    assert list(results) == ["small", "large", "medium"]
    starts = {name: start for name, start, _ in results.values()}
    assert starts["large"] < starts["medium"] < starts["small"]


def test_each_process_gets_its_share_of_the_threads():
    total = torch.get_num_threads()
    two = parallel.run_jobs(started_at, {"a": ("a",), "b": ("b",)}, processes=2)
    assert {threads for _, _, threads in two.values()} == {max(1, total // 2)}
    alone = parallel.run_jobs(started_at, {"a": ("a",)}, processes=2)  # one job: no process idles, all threads
    assert alone["a"][2] == total


def slot_after(seconds: float) -> int:
    """A job that holds its slot for `seconds`, then names it."""
    time.sleep(seconds)
    return parallel.current_slot()


def test_jobs_running_at_once_hold_different_slots_and_a_freed_slot_is_reused():
    # slot k is the GPU a job is placed on (k mod the device count) when CUDA is present
    jobs = {"long": (1.5,), "short": (0.2,), "next": (0.2,)}
    slots = parallel.run_jobs(slot_after, jobs, processes=2, cost={"long": 3, "short": 2, "next": 1})
    assert slots["long"] != slots["short"] and {slots["long"], slots["short"]} == {0, 1}
    assert slots["next"] == slots["short"]  # started while "long" still held its slot


def test_a_failure_is_raised_and_jobs_not_started_are_cancelled(tmp_path):
    jobs = {"fail": ("fail", str(tmp_path)), "later": ("later", str(tmp_path))}
    with pytest.raises(RuntimeError, match="job failed on purpose"):
        parallel.run_jobs(fail_or_mark, jobs, processes=1, cost={"fail": 2, "later": 1})
    assert not (tmp_path / "later").exists()


def test_library_warnings_keep_their_category():
    # warnings.warn as the job itself: the warning is raised from parallel.py, inside this library
    with pytest.warns(RuntimeWarning, match="^job: running low"):
        parallel.run_jobs(warnings.warn, {"job": ("running low", RuntimeWarning)}, processes=1)


def test_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A killed kernel leaves no worker behind to train on into the next attempt's run folders."""
    script = tmp_path / "start_jobs.py"
    script.write_text("import time\nfrom roentgen_lib import parallel\nif __name__ == '__main__':\n"
                      "    parallel.run_jobs(time.sleep, {'a': (120,), 'b': (120,)}, processes=2)\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = [child for child in psutil.Process(parent.pid).children()
                       if "spawn_main" in " ".join(child.cmdline())]
        assert len(workers) == 2, "the two workers did not start"
        parent.kill()
        parent.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers {[w.pid for w in alive]} outlived the process that started them"
    finally:
        parent.kill()
        for worker in workers:
            if worker.is_running():
                worker.kill()
