"""Run the notebooks in order with papermill and write a manifest per notebook run.

Usage (what `make reproduce` calls)::

    python -m roentgen_lib.runs --profile demo
    python -m roentgen_lib.runs --profile tiny --only 01_data_prep -p seed=1 -p n_images=24
    python -m roentgen_lib.runs --profile demo --from 04_sampling     # continue after a failure

Each notebook gets `profile` plus those `-p` overrides it declares in its `parameters` cell, runs
with the notebooks folder as working directory, and lands in `papermill_runs/<profile>/`. A notebook
is executed into a temporary file and moved into place only when it succeeds, so a failure never
overwrites a good earlier result: the failed copy is kept as `<name>.failed.ipynb`, the failing
cell and error are printed with the command that continues from that notebook (`--from`), and the
run stops. Every stage reuses what earlier runs finished (datasets, base, runs, synthetic images).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import papermill
import psutil
from tqdm.auto import tqdm

from roentgen_lib import config
from roentgen_lib.data.dataset import MANIFEST as DATASET_MANIFEST
from roentgen_lib.data.dataset import read_manifest
from roentgen_lib.files import write_json_atomic
from roentgen_lib.provenance import git_state, machine, package_versions

NOTEBOOKS_DIR = config.PROJECT_ROOT / "notebooks"
RUNS_DIR = config.PROJECT_ROOT / "papermill_runs"


class PeakMemory:
    """Peak resident memory of this process's children (the notebook kernel), sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def list_notebooks(only: Sequence[str] = (), notebooks_dir: Path = NOTEBOOKS_DIR,
                   start_from: str | None = None) -> list[Path]:
    """The numbered notebooks in order: those whose name contains one of `only`, from `start_from` on."""
    notebooks = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if start_from:
        first = [k for k, nb in enumerate(notebooks) if nb.stem.startswith(start_from)]
        if not first:
            names = ", ".join(nb.stem for nb in notebooks)
            raise config.ConfigError(f"--from {start_from!r} matches no notebook in {notebooks_dir}; notebooks: {names}")
        notebooks = notebooks[first[0]:]
    if only:
        notebooks = [nb for nb in notebooks if any(name in nb.stem for name in only)]
        if not notebooks:
            raise config.ConfigError(f"--only {list(only)} matches no notebook in {notebooks_dir}")
    return notebooks


def notebook_parameters(notebook: Path) -> set[str]:
    """Names declared in a notebook's `parameters` cell."""
    return set(papermill.inspect_notebook(str(notebook)))


def dataset_summaries(cfg: config.Config) -> dict[str, dict]:
    """Fingerprint, rows per split and skipped inputs of the datasets this config points at."""
    if (cfg.dataset_path / DATASET_MANIFEST).is_file():
        manifest = read_manifest(cfg.dataset_path)
        return {"cxr_dataset": {k: manifest[k] for k in ("fingerprint", "rows", "skipped")}}
    return {}


def run_notebook(notebook: Path, parameters: dict, out_dir: Path) -> dict:
    """Execute one notebook; return its status, timing and memory (the manifest body)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / notebook.name
    partial = out_dir / f".{notebook.stem}.running.ipynb"
    record: dict = {"notebook": notebook.name, "parameters": parameters, "status": "ok"}
    start = time.perf_counter()
    with PeakMemory() as memory:
        try:
            papermill.execute_notebook(str(notebook), str(partial), parameters=parameters,
                                       cwd=str(notebook.parent), progress_bar=False, log_output=False)
        except papermill.PapermillExecutionError as error:
            record.update(status="failed", cell=error.exec_count, error=f"{error.ename}: {error.evalue}")
    record["wall_seconds"] = round(time.perf_counter() - start, 2)
    record["peak_memory_mb"] = round(memory.peak_bytes / 2**20, 1)
    if record["status"] == "ok":
        partial.replace(target)
    else:
        partial.replace(out_dir / f"{notebook.stem}.failed.ipynb")
    return record


def run(profile: str, only: Sequence[str] = (), overrides: dict | None = None,
        out_dir: Path | None = None, notebooks_dir: Path = NOTEBOOKS_DIR, start_from: str | None = None) -> list[dict]:
    """Run the notebooks of a profile; stop at the first failure. Returns one record per notebook."""
    overrides = overrides or {}
    cfg = config.resolve(profile, **overrides)  # refuse bad parameters before anything runs
    declared = {nb: notebook_parameters(nb) for nb in list_notebooks(only, notebooks_dir, start_from)}
    unused = set(overrides) - set().union(*declared.values())
    if unused:
        raise config.ConfigError(f"parameters {sorted(unused)} are not declared by any selected notebook")
    out_dir = out_dir or RUNS_DIR / profile
    records = []
    for notebook, names in tqdm(declared.items(), desc=f"notebooks ({profile})", unit="nb"):
        params = {"profile": profile, **{k: v for k, v in overrides.items() if k in names}}
        record = run_notebook(notebook, params, out_dir)
        record.update(profile=profile, config=cfg.to_dict(), datasets=dataset_summaries(cfg),
                      git=git_state(), packages=package_versions(), machine=machine())
        write_json_atomic(out_dir / f"{notebook.stem}.manifest.json", record)
        records.append(record)
        if record["status"] != "ok":
            tqdm.write(f"FAILED {notebook.name}, cell {record['cell']}: {record['error']}\n"
                       f"  executed copy: {out_dir / (notebook.stem + '.failed.ipynb')}\n"
                       f"  after fixing it, continue with: python -m roentgen_lib.runs --profile {profile} "
                       f"--from {notebook.stem}")
            break
        tqdm.write(f"ok {notebook.name} in {record['wall_seconds']} s, peak {record['peak_memory_mb']} MB")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 1 when a notebook fails, 2 for bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.runs", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo", help=f"one of {', '.join(config.PROFILE_NAMES)}")
    parser.add_argument("--only", action="append", default=[], help="run only notebooks whose name contains this")
    parser.add_argument("--from", dest="start_from", default=None, metavar="NOTEBOOK",
                        help="start at this notebook (e.g. 04_sampling), to continue after a failure")
    parser.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE",
                        help="override a notebook parameter (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default papermill_runs/<profile>)")
    args = parser.parse_args(argv)
    try:
        records = run(args.profile, args.only, config.parse_overrides(args.params), args.out,
                      start_from=args.start_from)
    except config.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
