"""Benchmark: our U-Net fine-tuning loop against diffusers' reference text-to-image training script.

    make bench-train      # or: .venv/bin/python tests/bench/bench_train.py [--steps 60] [--repeats 2]

Target: ours >= 1.5x the reference's images/s when training the U-Net alone (full fine-tune, no
EMA), with no more peak memory. A benchmark, not a test: it reports, it asserts nothing.
About 6 minutes on 2 idle cores; writes the table to data/bench/bench_train.md too.

The reference is diffusers' `examples/text_to_image/train_text_to_image.py`, run unmodified from
the git-ignored `.reference/` folder (it is never copied into this repository). Take it once from
the diffusers repository at tag v0.40.0 (the newest release tag in the snapshot available here;
our installed diffusers is 0.42.1) and save it as
`.reference/diffusers-v0.40.0/train_text_to_image.py`.

Both sides get, in data/bench/ (git-ignored): the same untrained demo-architecture tiny Stable
Diffusion (`pretrain.build_components("demo", 64, seed=0)`, saved as a diffusers folder), the same
256 phantom image/prompt pairs at 64 px (a `DatasetDict` for ours, an imagefolder with
metadata.jsonl for the reference), batch size 32, learning rate 1e-4, constant schedule without
warm-up, fp32, gradient clipping at 1.0, AdamW with weight decay 1e-2, no EMA, no checkpoint or
validation during the steps. Each side is its own subprocess with the same environment
(OMP_NUM_THREADS=MKL_NUM_THREADS=2, so torch uses 2 threads; Hugging Face offline): the
reference script by path, ours as this script in worker mode (--ours) calling `train.train_model`.

Method. Each side runs N and 2N steps (a "pair"); images/s is batch * N / (wall_2N - wall_N), the
steady-state rate with start-up and shutdown cancelled out (imports, model loading, our latent
caching and final validation, both sides' final save). The ratio ours/reference uses this number.
Peak memory is the largest resident set size summed over the process tree, sampled with psutil
every 50 ms, over the whole 2N run. Two in-process numbers are shown for comparison: ours'
`TrainResult.images_per_second` (its own step timer, validation excluded) and the reference's
rate between its progress-bar updates for steps 5 and the last one (timestamped as they arrive).
Runs alternate reference/ours; with --repeats > 1 the table gives the median and the range.
"other load" is how many CPU cores other processes kept busy, on average, during a side's runs
(machine-wide busy CPU time minus the run's own, over its wall time): well above 0, the timings
are contended (2 cores, 2 threads per run) and should be repeated on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import psutil

from roentgen_lib import config
from roentgen_lib.data.dataset import build_dataset
from roentgen_lib.pretrain import build_components
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.train import train_model

ROOT = config.PROJECT_ROOT
BENCH = ROOT / "data" / "bench"
REFERENCE = ROOT / ".reference" / "diffusers-v0.40.0" / "train_text_to_image.py"
REFERENCE_URL = ("https://raw.githubusercontent.com/huggingface/diffusers/v0.40.0/"
                 "examples/text_to_image/train_text_to_image.py")
N_PAIRS = 256
IMAGE_SIZE = 64
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
THREADS = 2
SAMPLE_SECONDS = 0.05
SKIPPED_STEPS = 5  # warm-up steps left out of the reference's progress-bar rate
TARGET_RATIO = 1.5
CONTENDED_CORES = 0.2  # other processes' average load above which the caption flags the timings
PROGRESS = re.compile(r"Steps:.*?\|\s*(\d+)/(\d+) \[")
SIDE_NAMES = {"reference": "reference (diffusers v0.40.0 train_text_to_image.py)", "ours": "ours (roentgen_lib.train)"}


@dataclass(frozen=True)
class Run:
    """One measured subprocess: wall time, peak tree RSS, other processes' load, timestamped output lines."""

    wall_seconds: float
    peak_rss_mb: float
    other_cores: float  # CPU cores busy with anything but this run, on average over its wall time
    lines: list[tuple[float, str]]


@dataclass(frozen=True)
class Pair:
    """One side's N-step and 2N-step runs plus its in-process rate (images/s) of the 2N run."""

    short: Run
    long: Run
    own_rate: float


def reference_script() -> Path:
    """The reference script's path, or exit with how to fetch it."""
    if not REFERENCE.is_file():
        sys.exit(f"missing {REFERENCE.relative_to(ROOT)}: diffusers' reference script (v0.40.0) is not part of "
                 f"this repository. Fetch it into the git-ignored folder, unmodified:\n"
                 f"    mkdir -p {REFERENCE.parent.relative_to(ROOT)}\n"
                 f"    curl -fL -o {REFERENCE.relative_to(ROOT)} {REFERENCE_URL}\n"
                 f"or, from a diffusers clone: git show v0.40.0:examples/text_to_image/train_text_to_image.py")
    return REFERENCE


def prepare_base(folder: Path) -> Path:
    """Save the untrained demo-architecture tiny Stable Diffusion as a diffusers folder.

    Rebuilt on every run (a second): a cached copy would outlive changes to the architecture.
    """
    shutil.rmtree(folder, ignore_errors=True)
    build_components("demo", IMAGE_SIZE, seed=0).pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def prepare_pairs(folder: Path) -> Path:
    """256 phantom training pairs plus the validation split, as a DatasetDict for our side (once)."""
    if not (folder / "dataset_dict.json").is_file():
        built = build_dataset(config.resolve("demo", n_images=320, output_dir=str(BENCH / "dataset"),
                                             image_size=IMAGE_SIZE, progress=False)).dataset
        if len(built["train"]) < N_PAIRS:
            raise RuntimeError(f"phantom train split has {len(built['train'])} pairs, fewer than {N_PAIRS}")
        subset = {"train": built["train"].select(range(N_PAIRS)), "validation": built["validation"]}
        datasets.DatasetDict(subset).save_to_disk(str(folder))
    return folder


def export_imagefolder(pairs: Path, folder: Path) -> Path:
    """The same training pairs as PNG files with a metadata.jsonl (file_name, text) (once)."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, row in enumerate(datasets.load_from_disk(str(pairs))["train"]):
            name = f"{i:04d}.png"
            row["image"].save(folder / name)
            rows.append(json.dumps({"file_name": name, "text": row["prompt"]}))
        metadata.write_text("\n".join(rows) + "\n")
    return folder


def child_env() -> dict[str, str]:
    """The environment both sides run in: same thread count, offline, unbuffered output."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(BENCH / "hf-datasets-cache"),
            "PYTHONUNBUFFERED": "1"}


def warm_imagefolder_cache(folder: Path) -> None:
    """Build the reference's imagefolder Arrow cache before timing, so its N and 2N runs start alike."""
    datasets.load_dataset("imagefolder", data_files={"train": os.path.join(folder, "**")},
                          cache_dir=child_env()["HF_DATASETS_CACHE"])


def tree_rss_mb(process: psutil.Process) -> float:
    """Resident set size of a process and all its descendants, in MB (0 once it has exited)."""
    total = 0
    try:
        for member in [process, *process.children(recursive=True)]:
            total += member.memory_info().rss
    except psutil.Error:
        pass
    return total / 2**20


def read_lines(stream, log: Path, lines: list[tuple[float, str]]) -> None:
    """Copy a child's output to `log`, keeping each line (tqdm's \\r updates too) with its arrival time."""
    pending = b""
    with log.open("wb") as handle:
        while chunk := os.read(stream.fileno(), 65536):
            now = time.perf_counter()
            handle.write(chunk)
            parts = re.split(rb"[\r\n]", pending + chunk)
            pending = parts.pop()
            lines.extend((now, p.decode(errors="replace")) for p in parts if p)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent working (all processes, all cores) since boot."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)


def run_measured(command: list[str], log: Path) -> Run:
    """Run a command to completion: wall time, sampled peak RSS of its tree, others' CPU load; fail loudly."""
    lines: list[tuple[float, str]] = []
    busy_before, start = busy_cpu_seconds(), time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=read_lines, args=(child.stdout, log, lines))
    reader.start()
    process, peak = psutil.Process(child.pid), 0.0
    while not (ended := os.wait4(child.pid, os.WNOHANG))[0]:
        peak = max(peak, tree_rss_mb(process))
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - start
    _, status, usage = ended
    child.returncode = os.waitstatus_to_exitcode(status)
    own_cpu = usage.ru_utime + usage.ru_stime  # the child and the descendants it waited for
    reader.join()
    if child.returncode:
        sys.exit(f"{command[1]} failed (exit {child.returncode}); see {log.relative_to(ROOT)}")
    return Run(wall, peak, (busy_cpu_seconds() - busy_before - own_cpu) / wall, lines)


def reference_command(script: Path, steps: int, imagefolder: Path, base: Path, output: Path) -> list[str]:
    """The reference's command line for a U-Net-only full fine-tune matching ours."""
    return [sys.executable, str(script), "--pretrained_model_name_or_path", str(base),
            "--train_data_dir", str(imagefolder), "--caption_column", "text", "--resolution", str(IMAGE_SIZE),
            "--center_crop", "--train_batch_size", str(BATCH_SIZE), "--max_train_steps", str(steps),
            "--learning_rate", str(LEARNING_RATE), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--mixed_precision", "no", "--dataloader_num_workers", "0", "--seed", "0",
            "--checkpointing_steps", str(10 * steps), "--output_dir", str(output)]


def ours_command(steps: int, run_dir: Path) -> list[str]:
    """This script in worker mode: our side for `steps` steps, as its own process."""
    return [sys.executable, str(Path(__file__).resolve()), "--ours", str(steps), "--run-dir", str(run_dir)]


def train_ours(steps: int, run_dir: Path) -> None:
    """Worker mode: `train.train_model` with the same settings as the reference (writes run_dir/run.json)."""
    cfg = config.resolve("demo", train_unet=True, train_text_encoder=False, method="full", image_size=IMAGE_SIZE,
                         batch_size=BATCH_SIZE, max_steps=steps, learning_rate=LEARNING_RATE, lr_scheduler="constant",
                         lr_warmup_steps=0, mixed_precision="no", ema_decay=0.0, validation_every=10 * steps,
                         checkpoint_every=10 * steps, progress=False, resume=False, seed=0,
                         run_name=run_dir.name, models_dir=str(run_dir.parent))
    splits = datasets.load_from_disk(str(BENCH / "pairs"))
    pairs = {name: (list(split["image"]), list(split["prompt"])) for name, split in splits.items()}
    train_model(cfg, pairs["train"], pairs["validation"], base_path=str(BENCH / "base"), run_dir=run_dir)


def progress_rate(lines: list[tuple[float, str]]) -> float:
    """Images/s between the reference's progress-bar updates for step SKIPPED_STEPS and its last step."""
    seen: dict[int, float] = {}
    for stamp, line in lines:
        match = PROGRESS.search(line)
        if match:
            seen.setdefault(int(match.group(1)), stamp)
    steps = sorted(s for s in seen if s >= SKIPPED_STEPS)
    if len(steps) < 2:
        return float("nan")
    return BATCH_SIZE * (steps[-1] - steps[0]) / (seen[steps[-1]] - seen[steps[0]])


def steady_rate(pair: Pair, steps: int) -> float:
    """Images/s from the wall-time difference of the 2N- and N-step runs."""
    return BATCH_SIZE * steps / (pair.long.wall_seconds - pair.short.wall_seconds)


def spread(values: list[float], digits: int) -> str:
    """Median, with the range when there is more than one value."""
    text = f"{statistics.median(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def caption(ratio: float, less_memory: bool, steps: int, repeats: int, other_cores: float) -> str:
    """The table's caption: the setting, the target, whether this run met it, and contention if any."""
    verdict = "met" if ratio >= TARGET_RATIO and less_memory else "not met"
    contended = (f" Contended: other processes kept {other_cores:.1f} cores busy on average during the runs."
                 if other_cores > CONTENDED_CORES else "")
    return (f"Table: U-Net-only full fine-tune, {N_PAIRS} pairs at {IMAGE_SIZE} px, batch {BATCH_SIZE}, fp32, "
            f"{THREADS} threads, {repeats} pair(s) of {steps}/{2 * steps}-step runs per side; "
            f"images/s = {BATCH_SIZE} x {steps} / (wall of {2 * steps} steps - wall of {steps} steps). "
            f"Target: ours >= {TARGET_RATIO}x the reference's images/s with no more peak memory; "
            f"here {ratio:.2f}x with {'no more' if less_memory else 'more'} memory: {verdict}.{contended}")


def table(pairs: dict[str, list[Pair]], steps: int) -> str:
    """The markdown table: one row per side, ratios against the reference's median steady rate."""
    rates = {side: [steady_rate(p, steps) for p in runs] for side, runs in pairs.items()}
    memory = {side: [p.long.peak_rss_mb for p in runs] for side, runs in pairs.items()}
    reference_rate = statistics.median(rates["reference"])
    less_memory = statistics.median(memory["ours"]) <= statistics.median(memory["reference"])
    header = (f"| side | images/s | peak memory (MB) | wall s ({steps} / {2 * steps} steps) "
              f"| ours/reference images/s | images/s, own timer | other load (cores) |")
    other = statistics.median(r.other_cores for runs in pairs.values() for p in runs for r in (p.short, p.long))
    lines = [caption(statistics.median(rates["ours"]) / reference_rate, less_memory, steps, len(pairs["ours"]), other),
             "", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for side, runs in pairs.items():
        walls = f"{spread([p.short.wall_seconds for p in runs], 1)} / {spread([p.long.wall_seconds for p in runs], 1)}"
        lines.append(f"| {SIDE_NAMES[side]} | {spread(rates[side], 1)} | {spread(memory[side], 0)} | {walls} "
                     f"| {spread([r / reference_rate for r in rates[side]], 2)} "
                     f"| {spread([p.own_rate for p in runs], 1)} "
                     f"| {spread([r.other_cores for p in runs for r in (p.short, p.long)], 2)} |")
    return "\n".join(lines) + "\n"


def measure(steps: int, repeats: int) -> dict[str, list[Pair]]:
    """Prepare base and data, then alternate reference and ours through `repeats` N/2N pairs."""
    script = reference_script()
    with library_progress_bars(False):
        base = prepare_base(BENCH / "base")
        pairs = prepare_pairs(BENCH / "pairs")
        imagefolder = export_imagefolder(pairs, BENCH / "imagefolder")
        warm_imagefolder_cache(imagefolder)
    runs_dir, logs = BENCH / "runs", BENCH / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[Pair]] = {"reference": [], "ours": []}
    for repeat in range(repeats):
        done: dict[tuple[str, int], Run] = {}
        for n in (steps, 2 * steps):
            for side in results:
                name = f"{side}-{n}"
                shutil.rmtree(runs_dir / name, ignore_errors=True)
                command = (reference_command(script, n, imagefolder, base, runs_dir / name) if side == "reference"
                           else ours_command(n, runs_dir / name))
                done[side, n] = run_measured(command, logs / f"{name}-{repeat}.log")
                print(f"repeat {repeat + 1}/{repeats}: {name} steps took {done[side, n].wall_seconds:.1f} s",
                      file=sys.stderr)
        own = {"reference": progress_rate(done["reference", 2 * steps].lines),
               "ours": json.loads((runs_dir / f"ours-{2 * steps}" / "run.json").read_text())["images_per_second"]}
        for side, pairs_of_side in results.items():
            pairs_of_side.append(Pair(done[side, steps], done[side, 2 * steps], own[side]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="N: each side runs N and 2N steps")
    parser.add_argument("--repeats", type=int, default=2, help="N/2N pairs per side")
    parser.add_argument("--ours", type=int, metavar="STEPS", help="worker mode: run our side only (used internally)")
    parser.add_argument("--run-dir", type=Path, help="worker mode: the run folder")
    args = parser.parse_args()
    if args.ours:
        train_ours(args.ours, args.run_dir)
        return
    text = table(measure(args.steps, args.repeats), args.steps)
    (BENCH / "bench_train.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
