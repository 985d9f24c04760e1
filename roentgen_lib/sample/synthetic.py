"""Synthetic datasets: N images per prompt, saved as a Hugging Face dataset with what made each image.

Prompts come from a list, a CSV file (a `prompt` column), a split of the real dataset (its report
prompts, so real and synthetic images can be compared prompt for prompt), or are composed from
finding specs (finding, side, severity). Each row stores the prompt, seed, sampler settings, the
model and its weight fingerprint, and the intended labels (the labeler's reading of the prompt,
the same reading the phantom renderer draws real images from).

Generation is resumable: images are written in fixed batches to `.<name>.parts/` next to the
output, each batch file atomically; an interrupted run keeps its finished batches and the rerun
draws only the rest, giving the same dataset bit for bit. The finished dataset replaces the output
folder atomically.

Generation is split by rank: with `processes=N` (one per GPU where there are GPUs), or under
`accelerate launch` / `torchrun`, rank r draws batches r, r+N, r+2N, ... into the shared parts folder.
The batches are the same whoever draws them, so N processes give the dataset one process gives.

Usage::

    prompts = prompt_table(cfg)                                   # cfg.synthetic_prompts sources
    data = generate_dataset(model, prompts, cfg.synthetic_path, settings, images_per_prompt=4, seed=0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from roentgen_lib.config import Config, project_path
from roentgen_lib.data.dataset import load as load_real
from roentgen_lib.files import plan_folder, replace_dir, temporary_sibling, write_file_atomic, write_json_atomic
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.parallel import run_jobs
from roentgen_lib.sample.pipelines import Model, SamplingError, SamplingSettings, generate, grey, load_model
from roentgen_lib.text.compose import NORMAL_PROMPT, compose_prompt, finding_specs
from roentgen_lib.text.labels import OBSERVATIONS, label_report, label_vector

MANIFEST = "roentgen_synthetic.json"
FEATURES = datasets.Features({
    "image": datasets.Image(), "prompt": datasets.Value("string"), "source": datasets.Value("string"),
    "spec": datasets.Value("string"), "seed": datasets.Value("int64"), "model": datasets.Value("string"),
    "model_fingerprint": datasets.Value("string"), "scheduler": datasets.Value("string"),
    "steps": datasets.Value("int32"), "guidance_scale": datasets.Value("float32"),
    "negative_prompt": datasets.Value("string"), **{obs: datasets.Value("float32") for obs in OBSERVATIONS},
    "intended": datasets.Value("string"),
})


def spec_prompts(specs: list[dict], include_normal: bool = True) -> pd.DataFrame:
    """Prompts composed from specs (plus the normal prompt), with the spec stored per row."""
    rows = [{"prompt": compose_prompt(**spec), "source": "specs", "spec": json.dumps(spec, sort_keys=True)} for spec in specs]
    if include_normal:
        rows.append({"prompt": NORMAL_PROMPT, "source": "specs", "spec": json.dumps({"finding": "No Finding"})})
    return pd.DataFrame(rows)


def split_prompts(cfg: Config, split: str) -> pd.DataFrame:
    """The report prompts of one split of the real dataset; `source` names the real image (split:image_id)."""
    data = load_real(cfg)
    if split not in data:
        raise SamplingError(f"split {split!r} is not in the dataset; splits: {', '.join(data)}")
    part = data[split].select_columns(["prompt", "image_id"])
    return pd.DataFrame({"prompt": list(part["prompt"]), "source": [f"{split}:{i}" for i in part["image_id"]], "spec": ""})


def csv_prompts(path: str | Path) -> pd.DataFrame:
    """Prompts from a CSV file with a `prompt` column (other columns are ignored)."""
    path = project_path(path)
    if not path.is_file():
        raise SamplingError(f"prompt file {path} does not exist")
    table = pd.read_csv(path)
    if "prompt" not in table.columns:
        raise SamplingError(f"{path} has no 'prompt' column (columns: {', '.join(map(str, table.columns))})")
    empty = [k for k, p in enumerate(table["prompt"]) if pd.isna(p) or not str(p).strip()]
    if empty:  # read_csv makes an empty cell NaN, which str() would turn into the prompt "nan"
        raise SamplingError(f"{path}: the 'prompt' column is empty in data rows {', '.join(map(str, empty[:5]))}"
                            f"{' ...' if len(empty) > 5 else ''} (counting from 0); give every row a prompt")
    return pd.DataFrame({"prompt": table["prompt"].astype(str), "source": [f"csv:{path.name}:{k}" for k in range(len(table))], "spec": ""})


def list_prompts(prompts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt": list(prompts), "source": "list", "spec": ""})


def prompt_table(cfg: Config) -> pd.DataFrame:
    """All prompts named by `cfg.synthetic_prompts`: split names, "specs", or CSV paths, comma separated.

    A split contributes at most `cfg.synthetic_split_prompts` of its reports (a seeded sample, in split order).
    """
    tables = []
    for source in (s.strip() for s in cfg.synthetic_prompts.split(",") if s.strip()):
        if source == "specs":
            tables.append(spec_prompts(cfg.limit(finding_specs())))
        elif source.endswith(".csv"):
            tables.append(csv_prompts(source))
        else:
            reports = split_prompts(cfg, source)
            limit = min(cfg.synthetic_split_prompts or len(reports), len(reports))
            tables.append(reports.sample(n=limit, random_state=cfg.seed).sort_index())
    if not tables:
        raise SamplingError("synthetic_prompts names no source; use e.g. 'test,specs' or a .csv path")
    return pd.concat(tables, ignore_index=True)


def plan_jobs(prompts: pd.DataFrame, images_per_prompt: int, seed: int) -> pd.DataFrame:
    """One row per image: prompt k's copies are adjacent; image j gets seed + j."""
    jobs = prompts.loc[prompts.index.repeat(images_per_prompt)].reset_index(drop=True)
    jobs["seed"] = seed + np.arange(len(jobs))
    return jobs


def plan_fingerprint(jobs: pd.DataFrame, model: Model, settings: SamplingSettings) -> str:
    """What determines every image: prompts, seeds, model weights and sampler settings (batches included)."""
    digest = hashlib.sha256(model.fingerprint.encode())
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(jobs[["prompt", "seed"]].to_json(orient="values").encode())
    return digest.hexdigest()


def draw_batches(model: Model, jobs: pd.DataFrame, settings: SamplingSettings, parts: Path, progress: bool,
                 rank: int = 0, world: int = 1) -> dict:
    """Draw every batch of share `rank` of `world` not yet on disk (each batch file written atomically);
    return images drawn and seconds."""
    starts = range(0, len(jobs), settings.batch_size)[rank::world]
    todo = [s for s in starts if not (parts / f"batch-{s:08d}.safetensors").is_file()]
    started, drawn = time.perf_counter(), 0
    remaining = sum(min(settings.batch_size, len(jobs) - s) for s in todo)
    share = sum(min(settings.batch_size, len(jobs) - s) for s in starts)
    with tqdm(total=share, initial=share - remaining,
              desc="synthetic images", unit="img", disable=not progress) as bar:
        for start in todo:
            batch = jobs.iloc[start : start + settings.batch_size]
            images = np.stack([grey(im) for im in generate(model, list(batch.prompt), list(batch.seed), settings)])
            write_file_atomic(parts / f"batch-{start:08d}.safetensors",
                              lambda path: save_file({"images": torch.from_numpy(images)}, str(path)))
            bar.update(len(batch))
            drawn += len(batch)
    return {"images_drawn": drawn, "seconds": round(time.perf_counter() - started, 2)}


def draw_share(load_args: tuple, jobs: pd.DataFrame, settings: SamplingSettings, parts: Path, rank: int,
               world: int) -> int:
    """A worker process's job: load the model again (`load_model(*load_args)`) and draw share `rank` of `world`."""
    with library_progress_bars(False):
        return draw_batches(load_model(*load_args), jobs, settings, parts, False, rank, world)["images_drawn"]


def draw_in_processes(model: Model, jobs: pd.DataFrame, settings: SamplingSettings, parts: Path, progress: bool,
                      processes: int) -> dict:
    """Draw the missing batches: in `processes` worker processes (a GPU each where there are GPUs), or, with
    one, in this process, which draws its rank's share when launched as one of several (accelerate, torchrun)."""
    if processes == 1 or model.load_args is None:
        state = PartialState()
        timing = draw_batches(model, jobs, settings, parts, progress, state.process_index, state.num_processes)
        state.wait_for_everyone()
        return timing
    started = time.perf_counter()
    shares = {f"{model.name} {r + 1}/{processes}": (model.load_args, jobs, settings, parts, r, processes)
              for r in range(processes)}
    drawn = run_jobs(draw_share, shares, processes, desc=f"synthetic images ({model.name})" if progress else None)
    return {"images_drawn": sum(drawn.values()), "seconds": round(time.perf_counter() - started, 2)}


def synthetic_records(jobs: pd.DataFrame, parts: str, fixed: dict, batch_size: int):
    """Dataset rows: each drawn image with its prompt, seed, the `fixed` model/settings columns and intended labels."""
    labels_by_prompt = {p: label_report(p) for p in jobs.prompt.unique()}
    for start in range(0, len(jobs), batch_size):
        images = load_file(str(Path(parts) / f"batch-{start:08d}.safetensors"))["images"].numpy()
        for image, job in zip(images, jobs.iloc[start : start + batch_size].itertuples()):
            labels = labels_by_prompt[job.prompt]
            yield {"image": Image.fromarray(image), "prompt": job.prompt, "source": job.source, "spec": job.spec,
                   "seed": int(job.seed), **fixed, **label_vector(labels), "intended": json.dumps(labels, sort_keys=True)}


def generate_dataset(model: Model, prompts: pd.DataFrame, out: Path, settings: SamplingSettings,
                     images_per_prompt: int, seed: int, progress: bool = True, processes: int = 1) -> datasets.Dataset:
    """Draw `images_per_prompt` images per prompt row and save them as a dataset at `out` (resumable), the
    batches split over `processes` worker processes (or over the ranks of a distributed launch).

    An existing dataset at `out` made by the same plan is returned as is.
    """
    out = Path(out)
    jobs = plan_jobs(prompts, images_per_prompt, seed)
    fingerprint = plan_fingerprint(jobs, model, settings)
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("fingerprint") == fingerprint:
        return datasets.load_from_disk(str(out))
    state = PartialState()
    with state.main_process_first():  # one rank checks the parts folder against the plan, then the others find it
        parts = plan_folder(out, fingerprint, "unfinished synthetic images")
    timing = draw_in_processes(model, jobs, settings, parts, progress, processes)
    if state.is_main_process:
        assemble(jobs, parts, out, model, settings, progress, {"fingerprint": fingerprint, "seed": seed, "last_run": timing,
                                                                "images_per_prompt": images_per_prompt})
    state.wait_for_everyone()
    return datasets.load_from_disk(str(out))


def assemble(jobs: pd.DataFrame, parts: Path, out: Path, model: Model, settings: SamplingSettings, progress: bool,
             record: dict) -> None:
    """Turn the finished batches into the dataset at `out` (atomically) and remove them."""
    fixed = {"model": model.name, "model_fingerprint": model.fingerprint, "scheduler": settings.scheduler,
             "steps": settings.steps, "guidance_scale": settings.guidance_scale, "negative_prompt": settings.negative_prompt}
    work = temporary_sibling(out)
    try:
        with library_progress_bars(progress):
            data = datasets.Dataset.from_generator(
                synthetic_records, features=FEATURES, cache_dir=str(work / "cache"),
                gen_kwargs={"jobs": jobs, "parts": str(parts), "fixed": fixed, "batch_size": settings.batch_size})
            data.save_to_disk(str(work / "dataset"))
        write_json_atomic(work / "dataset" / MANIFEST, {
            **record, "rows": len(jobs), "model": model.name, "model_source": model.source,
            "model_fingerprint": model.fingerprint, "settings": dataclasses.asdict(settings),
            "sources": jobs.source.str.split(":").str[0].value_counts().to_dict()})
        replace_dir(work / "dataset", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(parts)


def load(out: Path) -> datasets.Dataset:
    """A finished synthetic dataset (a clear error when there is none at `out`)."""
    if not (Path(out) / MANIFEST).is_file():
        raise FileNotFoundError(f"no finished synthetic dataset at {out}: run 04_sampling (or generate_dataset) first")
    return datasets.load_from_disk(str(out))


def read_manifest(out: Path) -> dict:
    """What `generate_dataset` recorded about a synthetic dataset (model, settings, timing)."""
    return json.loads((Path(out) / MANIFEST).read_text())


def describe(data: datasets.Dataset, findings: tuple[str, ...] = ("No Finding", "Cardiomegaly", "Pleural Effusion",
                                                                  "Pneumothorax", "Edema", "Consolidation")) -> pd.DataFrame:
    """Images per prompt source, and how many are meant to show each finding (intended positives)."""
    frame = data.select_columns(["source", *findings]).to_pandas()
    frame["source"] = frame.source.str.split(":").str[0]
    table = frame.groupby("source")[list(findings)].agg(lambda v: int((v == 1.0).sum()))
    table.insert(0, "images", frame.groupby("source").size())
    return table
