"""Build the image/prompt dataset that every later stage reads: phantom world or MIMIC-CXR.

`build_dataset(cfg)` writes a Hugging Face `DatasetDict` (train / validation / test, disjoint by
patient) to `cfg.dataset_path`, atomically, with a manifest of counts, skipped inputs by reason and
a content fingerprint. Columns: image, prompt, one column per CheXpert observation (1 positive,
0 negative, -1 uncertain, None unmentioned), subject_id, study_id, image_id, split, report_labels
(the labeler's full output as JSON) and drawn (what the phantom renderer drew, as JSON; "" for
real images).

Images are built in shards of `SHARD_ROWS` rows by `cfg.data_workers` processes, each shard saved
atomically under `.<name>.parts/`: a build that is killed keeps its finished shards, and the rerun
builds only the rest, ending with the same dataset byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from roentgen_lib.config import Config
from roentgen_lib.data import mimic
from roentgen_lib.data.masks import load_lung_masks
from roentgen_lib.data.phantom import render, render_size
from roentgen_lib.files import check_free_space, fingerprint_dir, plan_folder, replace_dir, temporary_sibling, write_json_atomic
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.text.compose import composed_reports
from roentgen_lib.text.labels import OBSERVATIONS, PATHOLOGIES, device_kinds, label_report, label_vector
from roentgen_lib.text.reports import read_iu_reports, report_prompt

SPLITS = ("train", "validation", "test")
MANIFEST = "roentgen_manifest.json"
# Bump when a change alters what a shard holds for the same planned rows (how images are drawn or read,
# how reports are labelled): half-built datasets are then rebuilt from scratch, never mixed.
IMAGES_RECIPE_VERSION = 1
SHARD_ROWS = 500  # rows per shard: the unit a rerun resumes from and a worker process builds
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "prompt": datasets.Value("string"),
        **{obs: datasets.Value("float32") for obs in OBSERVATIONS},
        "subject_id": datasets.Value("string"),
        "study_id": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "split": datasets.Value("string"),
        "report_labels": datasets.Value("string"),
        "drawn": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class BuildResult:
    """What `build_dataset` produced: the dataset (read back from disk) and its bookkeeping."""

    dataset: datasets.DatasetDict
    path: Path
    skipped: pd.DataFrame  # reason, count
    fingerprint: str
    reused_shards: int = 0  # shards an interrupted earlier build had finished


def patient_split(subject_id: str, val_fraction: float, test_fraction: float) -> str:
    """Split of a patient from a hash of its id: stable across runs, seeds and dataset sizes."""
    u = int(hashlib.sha256(subject_id.encode()).hexdigest()[:12], 16) / 16**12
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def plan_phantom(cfg: Config) -> tuple[list[dict], Counter]:
    """One row per image to render: a seeded draw of IU reports (cycled if more images than reports).

    With `finding_repeats` > 1 each report with a positive finding enters the draw that many times
    (rendered as different images of the same patient, so splits stay patient-disjoint): IU-Xray is
    three quarters normal, too few findings for a small model to learn them from. `composed_reports`
    adds that many reports composed from finding specs ("no pneumothorax. large left pleural
    effusion."), one patient each: what a MIMIC-sized collection holds and IU-Xray does not, every
    finding on every side (IU-Xray's 12 training pneumothoraces cannot teach a model which side).
    """
    skipped: Counter = Counter()
    pool = []
    for report in read_iu_reports():
        prompt = report_prompt(report.sections)
        if prompt is None:
            skipped["no_impression_or_findings"] += 1
            continue
        abnormal = any(label["status"] == "positive" for name, label in label_report(prompt).items()
                       if name in PATHOLOGIES)
        pool.extend([(report.subject_id, report.report_id, prompt)] * (cfg.finding_repeats if abnormal else 1))
    pool.extend((f"composed-{k}", f"composed-{k}", prompt) for k, prompt in enumerate(composed_reports(cfg.composed_reports, cfg.seed)))
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    rows, copies = [], Counter()
    for index in range(cfg.n_images or len(pool)):
        subject_id, report_id, prompt = pool[order[index % len(pool)]]
        copies[report_id] += 1
        rows.append({"index": index, "subject_id": subject_id, "prompt": prompt, "image_id": f"{report_id}-{copies[report_id] - 1}",
                     "split": patient_split(subject_id, cfg.val_fraction, cfg.test_fraction)})
    return rows, skipped


def plan_mimic(cfg: Config) -> tuple[list[dict], Counter]:
    """One row per frontal MIMIC-CXR image with an official split (a seeded sample of n_images)."""
    mimic.check_layout(cfg.mimic_path, cfg.reports_root)
    rows, skipped = mimic.plan_rows(mimic.read_studies(cfg.mimic_path), cfg.n_images, cfg.seed)
    return rows.to_dict("records"), Counter(skipped)


def record(image: np.ndarray | Image.Image, prompt: str, labels: dict, row: dict, study_id: str, drawn: str) -> dict:
    """One dataset row in the shared schema (`labels`: `label_report(prompt)`)."""
    return {"image": image if isinstance(image, Image.Image) else Image.fromarray(image),
            "prompt": prompt, **label_vector(labels), "subject_id": str(row["subject_id"]),
            "study_id": study_id, "image_id": str(row.get("image_id", row.get("dicom_id"))),
            "split": row["split"], "report_labels": json.dumps(labels, sort_keys=True), "drawn": drawn}


def phantom_records(rows: list[dict], size: int, seed: int) -> Iterator[dict]:
    """Render each planned row; the image depends only on (seed, row index)."""
    masks = load_lung_masks(render_size(size))
    for row in rows:
        rng = np.random.default_rng([seed, row["index"]])
        mask = masks[rng.integers(len(masks))]
        labels = label_report(row["prompt"])
        image, drawn = render(labels, mask, rng, size, tuple(device_kinds(row["prompt"])))
        yield record(image, row["prompt"], labels, row, row["image_id"], json.dumps(drawn, sort_keys=True))


def mimic_records(rows: list[dict], size: int, mimic_root: str, reports_root: str, skipped: dict) -> Iterator[dict]:
    """Load each planned MIMIC row; unusable ones are counted in `skipped` by reason."""
    for row in rows:
        pair = mimic.load_pair(row, Path(mimic_root), Path(reports_root), size)
        if isinstance(pair, str):
            skipped[pair] = skipped.get(pair, 0) + 1
            continue
        yield record(pair[0], pair[1], label_report(pair[1]), row, str(row["study_id"]), "")


def empty_split() -> datasets.Dataset:
    """A split with no rows and the dataset's columns (a split no patient falls into)."""
    return datasets.Dataset.from_dict({name: [] for name in FEATURES}, features=FEATURES)


def build_shard(cfg: Config, rows: list[dict], target: Path) -> None:
    """Render (phantom) or load (MIMIC) one shard's rows into a dataset folder at `target`, atomically.

    The counts of skipped inputs are stored beside it (`skipped.json`). Runs in worker processes.
    """
    skipped: dict[str, int] = {}
    if cfg.data_source == "phantom":
        records = phantom_records(rows, cfg.image_size, cfg.seed)
    else:
        records = mimic_records(rows, cfg.image_size, str(cfg.mimic_path), str(cfg.reports_root), skipped)
    work = temporary_sibling(target)
    try:
        with library_progress_bars(False):
            kept = list(records)
            data = datasets.Dataset.from_list(kept, features=FEATURES) if kept else empty_split()
            data.save_to_disk(str(work / "shard"))
        write_json_atomic(work / "shard" / "skipped.json", skipped)
        os.replace(work / "shard", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plan_shards(rows: list[dict], shard_rows: int) -> list[tuple[str, list[dict]]]:
    """The rows of each split cut into shards named `<split>-<k>`, in split order."""
    shards = []
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        shards += [(f"{split}-{k // shard_rows:05d}", part[k : k + shard_rows]) for k in range(0, len(part), shard_rows)]
    return shards


def plan_fingerprint(cfg: Config, rows: list[dict], shard_rows: int) -> str:
    """What determines every shard: the planned rows, the settings and `IMAGES_RECIPE_VERSION`."""
    settings = {k: getattr(cfg, k) for k in ("data_source", "image_size", "seed", "mimic_root", "mimic_reports_root")}
    plan = [IMAGES_RECIPE_VERSION, rows, settings, shard_rows]
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def worker_count(cfg: Config) -> int:
    """Processes that build shards: `cfg.data_workers`, or one per CPU core this process may use."""
    return cfg.data_workers or len(os.sched_getaffinity(0))


def build_shards(cfg: Config, shards: list[tuple[str, list[dict]]], parts: Path) -> int:
    """Build every shard not yet in `parts` (in parallel when there are workers); return how many were reused."""
    todo = [(name, rows) for name, rows in shards if not (parts / name).is_dir()]
    total, workers = sum(len(rows) for _, rows in shards), min(worker_count(cfg), len(todo))
    with tqdm(total=total, initial=total - sum(len(rows) for _, rows in todo), desc="build dataset", unit="img",
              disable=not cfg.progress) as bar:
        if workers <= 1:
            for name, rows in todo:
                build_shard(cfg, rows, parts / name)
                bar.update(len(rows))
        else:  # spawn: a fresh interpreter per worker, safe inside a Jupyter kernel with threads and torch loaded
            try:
                with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                    futures = {pool.submit(build_shard, cfg, rows, parts / name): len(rows) for name, rows in todo}
                    for future in as_completed(futures):
                        future.result()
                        bar.update(futures[future])
            except BrokenProcessPool as error:
                raise RuntimeError(
                    "a dataset worker process died (finished shards are kept; rerun to continue). Out of memory? "
                    "Set data_workers=1. Called from a script? Workers re-import it, so put the call under "
                    "`if __name__ == \"__main__\":`") from error
    return len(shards) - len(todo)


def join_shards(shards: list[tuple[str, list[dict]]], parts: Path) -> tuple[dict[str, datasets.Dataset], Counter]:
    """The finished shards as one dataset per split, and their skipped inputs summed by reason."""
    splits, skipped = {}, Counter()
    for split in SPLITS:
        names = [name for name, _ in shards if name.rsplit("-", 1)[0] == split]
        pieces = [datasets.load_from_disk(str(parts / name)) for name in names]
        splits[split] = datasets.concatenate_datasets(pieces) if pieces else empty_split()
        for name in names:
            skipped.update(json.loads((parts / name / "skipped.json").read_text()))
    return splits, skipped


def build_dataset(cfg: Config, shard_rows: int = SHARD_ROWS) -> BuildResult:
    """Build, validate and atomically save the dataset of `cfg` (resuming a killed build); see the module docstring."""
    rows, skipped = plan_phantom(cfg) if cfg.data_source == "phantom" else plan_mimic(cfg)
    shards = plan_shards(rows, shard_rows)
    # shards plus the joined copy, at most one byte per pixel each (PNG compresses radiographs further)
    check_free_space(cfg.dataset_path.parent, 2 * len(rows) * cfg.image_size**2, f"the dataset of {len(rows)} images")
    parts = plan_folder(cfg.dataset_path, plan_fingerprint(cfg, rows, shard_rows), "unfinished dataset shards")
    reused = build_shards(cfg, shards, parts)
    work = temporary_sibling(cfg.dataset_path)
    try:
        splits, counts = join_shards(shards, parts)
        counts.update(skipped)
        check_patient_disjoint(splits)
        with library_progress_bars(cfg.progress):
            datasets.DatasetDict(splits).save_to_disk(str(work / "dataset"))
        fingerprint = fingerprint_dir(work / "dataset", "**/*.arrow")
        skipped_table = skip_table(counts)
        write_json_atomic(work / "dataset" / MANIFEST, {
            "config": cfg.to_dict(), "rows": {s: len(d) for s, d in splits.items()},
            "skipped": skipped_table.set_index("reason")["count"].to_dict(), "fingerprint": fingerprint})
        replace_dir(work / "dataset", cfg.dataset_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(parts)
    return BuildResult(datasets.load_from_disk(str(cfg.dataset_path)), cfg.dataset_path, skipped_table, fingerprint, reused)


def check_patient_disjoint(splits: dict[str, datasets.Dataset]) -> None:
    """Refuse a dataset in which one patient appears in two splits (train/test leakage)."""
    seen: dict[str, str] = {}
    for name, split in splits.items():
        for subject in set(split["subject_id"]):
            if seen.setdefault(subject, name) != name:
                raise ValueError(f"patient {subject} is in both {seen[subject]!r} and {name!r} splits: leakage")


def skip_table(counts: dict[str, int]) -> pd.DataFrame:
    """Skipped inputs by reason, largest first (reasons with zero count are listed too)."""
    reasons = ["no_impression_or_findings", "non_frontal_view", "not_in_split_file", "duplicate_dicom_id",
               "missing_image", "missing_report", "unreadable_image", "image_too_large"]
    table = pd.DataFrame({"reason": reasons, "count": [int(counts.get(r, 0)) for r in reasons]})
    return table.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)


def read_manifest(path: Path) -> dict:
    """The manifest `build_dataset` wrote into a dataset folder."""
    return json.loads((path / MANIFEST).read_text())


def load(cfg: Config) -> datasets.DatasetDict:
    """The dataset 01_data_prep wrote for this config, with a clear error when it is missing."""
    if not (cfg.dataset_path / MANIFEST).is_file():
        raise FileNotFoundError(f"no dataset at {cfg.dataset_path}: run 01_data_prep first "
                                f"(python -m roentgen_lib.runs --profile {cfg.profile} --only 01_data_prep)")
    return datasets.load_from_disk(str(cfg.dataset_path))
