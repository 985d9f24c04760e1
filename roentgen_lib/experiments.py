"""What 05_evaluation runs and 06_paper_figures reads: the prompts, images, judge and tables of every model.

`evaluate` holds the measures (the judge network, AUROC, side and size correct, FID, MS-SSIM, the
memorization audit, the text probe, the downstream classifier); this module applies them to a
profile's models the way 05 does:

- the prompt sets every model is scored on (report language, held-out phrasings, test-split reports)
  and each model's evaluation images, drawn once and cached;
- the real images and the judge trained on them (in the phantom world plus rendered references);
- one tidy table per model (`score_model`), the real-image reference rows, the autoencoder ceiling,
  the text-encoder probe and general-domain forgetting, the downstream experiment and its learning
  curve, the guidance sweep;
- the tables on disk: 05 writes them (`save_tables`), 06 reads them (`load_tables`).

Usage::

    real = real_images(cfg)
    judge = train_judge(cfg, real, load_model(cfg, "base").pipe.vae)
    table = score_model(cfg, name, evaluation_images(cfg, load_model(cfg, name)), judge, ...)
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from torch import nn

from roentgen_lib.config import Config, number_list
from roentgen_lib.data.dataset import load as load_real
from roentgen_lib.data.masks import load_lung_masks
from roentgen_lib.data.phantom import render_prompts, render_size
from roentgen_lib.evaluate import (FINDINGS, ClassifierFeatures, FindingNet, alignment_table, confusion_table,
                                   controllability_table, diversity_table, downstream_table, fid_table, frechet_distance,
                                   images_array, labels_of_row, memorization_audit, memorization_summary, predict,
                                   presence_only, pretrained_alignment_table, probe_table, text_embeddings, through_vae,
                                   train_classifier, truth_of_labels, truth_of_reports, truth_table)
from roentgen_lib.files import write_file_atomic, write_json_atomic
from roentgen_lib.models import Base
from roentgen_lib.parallel import run_jobs
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.provenance import git_state
from roentgen_lib.sample import Model, SamplingError, SamplingSettings, available_models, generate, grey, load_model
from roentgen_lib.sample.synthetic import generate_dataset, split_prompts
from roentgen_lib.train import CACHE_FOLDER, encode_pairs, list_source, validation_loss
from roentgen_lib.text.compose import HELD_OUT_PHRASINGS, NORMAL_PROMPT, finding_specs, negated_prompt


PROMPT_SETS = ("report language", "held-out phrasing", "test")


def evaluation_prompts(cfg: Config) -> pd.DataFrame:
    """The prompts every model is scored on, with `source` naming the set.

    "report language": every finding spec composed with a negation of another finding; "held-out
    phrasing": the same findings in words no composed report uses; "test": a seeded sample of
    `eval_prompts` test-split reports (source `test:<image_id>`, so each has a real counterpart).
    """
    test = split_prompts(cfg, "test")
    test = test.sample(n=min(cfg.eval_prompts, len(test)), random_state=cfg.seed).sort_index()
    return pd.concat([cfg.limit(report_language_prompts()), cfg.limit(held_out_prompts()), test], ignore_index=True)


def report_language_prompts() -> pd.DataFrame:
    """Every finding spec composed with a negation of another finding, and the normal report."""
    rows = [{"prompt": negated_prompt(**spec), "source": "report language", "spec": json.dumps(spec, sort_keys=True)}
            for spec in finding_specs()]
    rows.append({"prompt": NORMAL_PROMPT, "source": "report language", "spec": json.dumps({"finding": "No Finding"})})
    return pd.DataFrame(rows)


def held_out_prompts() -> pd.DataFrame:
    """The findings in phrasings no composed report uses."""
    return pd.DataFrame({"prompt": list(HELD_OUT_PHRASINGS), "source": "held-out phrasing", "spec": ""})


def prompt_set(sources) -> np.ndarray:
    """The prompt set of each row from its `source` ("test:<id>" -> "test")."""
    return np.array([s.split(":")[0] for s in sources])


def prompt_set_rows(data: datasets.Dataset, prompts: str) -> datasets.Dataset:
    """The rows of a synthetic dataset drawn for one prompt set."""
    if prompts not in PROMPT_SETS:
        raise ValueError(f"prompt set {prompts!r} is not one of {', '.join(PROMPT_SETS)}")
    return data.select(np.flatnonzero(prompt_set(data["source"]) == prompts))


def seen_in_training(prompts: list[str], train_prompts: list[str]) -> pd.DataFrame:
    """Whether each prompt occurs anywhere in a training report, also inside a longer sentence (lower case).

    Matching substrings, not whole sentences, errs on the side of "seen": an unseen prompt is truly unseen.
    """
    corpus = "\n".join(p.lower() for p in train_prompts)
    return pd.DataFrame({"prompt": prompts, "seen in training": [p.lower() in corpus for p in prompts]})


def model_names(cfg: Config) -> list[str]:
    """The models `eval_models` names ("all": the base and every finished run), checked to exist."""
    available = list(available_models(cfg))
    if cfg.eval_models.strip() == "all":
        return available
    names = [n.strip() for n in cfg.eval_models.split(",") if n.strip()]
    for name in names:
        if name not in available:
            raise SamplingError(f"eval_models names {name!r}, which is not a finished model; available: {', '.join(available)}")
    return names


def evaluation_images(cfg: Config, model: Model, processes: int = 1) -> datasets.Dataset:
    """`images_per_prompt` images of `model` for every evaluation prompt (cached and resumable, as in 04), drawn
    by `processes` processes."""
    return generate_dataset(model, evaluation_prompts(cfg), cfg.evaluation_path / "images" / model.name,
                            SamplingSettings.from_config(cfg), cfg.images_per_prompt, cfg.seed, cfg.progress, processes)


def draw_evaluation_images(cfg: Config, names: list[str]) -> None:
    """Draw (or find cached) the evaluation images of the named models: `worker_processes` models at a time,
    or, with `num_processes` > 1 (GPUs), one model at a time with its images split over them.

    Afterwards `evaluation_images` of each model returns its cached dataset.
    """
    if cfg.num_processes > 1:
        for name in names:
            evaluation_images(cfg, load_model(cfg, name), cfg.num_processes)
        return
    quiet = dataclasses.replace(cfg, progress=False)
    run_jobs(model_evaluation_images, {name: (quiet, name) for name in names}, cfg.worker_processes,
             desc="draw evaluation images" if cfg.progress else None)


def model_evaluation_images(cfg: Config, name: str) -> int:
    """Load the model `name` and draw its evaluation images (a job of `draw_evaluation_images`); the image count.

    A worker process starts with the libraries' progress bars on; they follow `cfg.progress` here.
    """
    with library_progress_bars(cfg.progress):
        return len(evaluation_images(cfg, load_model(cfg, name)))


def rendered_references(cfg: Config, prompts: list[str], per_prompt: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Phantom radiographs drawn for `prompts` (per_prompt each) and what was drawn; none outside the phantom world.

    The phantom world can render any report, so its "real" images need not come from the dataset
    alone: a balanced set for each finding and side trains the judge and extends the test set.
    """
    if cfg.data_source != "phantom" or not prompts:
        return np.zeros((0, cfg.image_size, cfg.image_size), np.uint8), truth_of_labels([])
    rendered = render_prompts(list(prompts) * per_prompt, load_lung_masks(render_size(cfg.image_size)), cfg.image_size, seed)
    labels = [labels_of_row({"drawn": json.dumps(drawn)}) for _, drawn in rendered]
    return np.stack([image for image, _ in rendered]), truth_of_labels(labels)


def is_composed(split) -> np.ndarray:
    """Rows of a dataset split whose report was composed from a spec (not IU-Xray or MIMIC)."""
    return np.array([s.startswith("composed-") for s in split["subject_id"]])


@dataclasses.dataclass
class RealImages:
    """Real images with their truth: the judge's training set and the held-out test set."""

    train: np.ndarray
    train_truth: pd.DataFrame
    test: np.ndarray
    test_truth: pd.DataFrame
    report_train: np.ndarray  # training images from collected reports only (IU-Xray / MIMIC): the downstream set
    report_train_truth: pd.DataFrame


def real_split(cfg: Config, name: str) -> datasets.Dataset:
    """A split of the real dataset as evaluation holds it in memory: at most `eval_real_images` rows (a seeded
    sample kept in dataset order), so evaluation's memory does not grow with the dataset."""
    split = load_real(cfg)[name]
    if cfg.eval_real_images is None or len(split) <= cfg.eval_real_images:
        return split
    return split.select(np.sort(np.random.default_rng(cfg.seed).choice(len(split), cfg.eval_real_images, replace=False)))


def real_images(cfg: Config) -> RealImages:
    """Training and test images of the dataset; in the phantom world plus rendered references.

    The judge learns from the training split plus `4 x eval_references` rendered images per spec;
    the test split is extended by `eval_references` rendered images per spec (other seeds), so every
    finding and side has test positives (IU-Xray's test split has no pneumothorax).
    """
    data = {name: real_split(cfg, name) for name in ("train", "test")}
    train, test = images_array(data["train"], cfg.image_size), images_array(data["test"], cfg.image_size)
    train_truth, test_truth = truth_table(data["train"]), truth_table(data["test"])
    collected = ~is_composed(data["train"])
    specs = report_language_prompts().prompt.tolist()
    judge_extra = rendered_references(cfg, specs, 4 * cfg.eval_references, cfg.seed + 101)
    test_extra = rendered_references(cfg, specs, cfg.eval_references, cfg.seed + 202)
    return RealImages(np.concatenate([train, judge_extra[0]]), pd.concat([train_truth, judge_extra[1]], ignore_index=True),
                      np.concatenate([test, test_extra[0]]), pd.concat([test_truth, test_extra[1]], ignore_index=True),
                      train[collected], train_truth[collected].reset_index(drop=True))


def train_judge(cfg: Config, real: RealImages, vae: AutoencoderKL | None) -> FindingNet:
    """The finding classifier that scores every model, trained on real (and rendered) training images.

    Every synthetic image is decoded by the base's frozen `vae`, so the judge also learns from each
    training image as that VAE encodes and decodes it. Trained on sharp (and blurred) images alone,
    it read the decoder's rendering of a small pneumothorax as none: on real test images through the
    VAE it found 0.65 of them on the right side and 0.50 at the right size, and 0.93 / 0.90 when it
    also learnt from decodings (demo, README). None: real images alone.
    """
    images, truth = real.train, real.train_truth
    if vae is not None:
        decoded = through_vae(vae, images, cfg.image_size, progress=cfg.progress)
        images, truth = np.concatenate([images, decoded]), pd.concat([truth, truth], ignore_index=True)
    return train_classifier(images, truth, seed=cfg.seed, epochs=cfg.classifier_epochs, blur=cfg.judge_blur,
                            progress=cfg.progress)


def counterparts(cfg: Config, sources) -> np.ndarray:
    """The real test images behind "test:<image_id>" sources, in order."""
    test = load_real(cfg)["test"]
    position = {image_id: k for k, image_id in enumerate(test["image_id"])}
    ids = [s.split(":", 1)[1] for s in sources]
    return images_array(test.select([position[i] for i in ids]), cfg.image_size)


def label_groups(truth: pd.DataFrame) -> list[str]:
    """A group name per image: its positive findings joined ("normal" when none)."""
    return ["+".join(f for f in FINDINGS if row[f] == 1.0) or "normal" for _, row in truth.iterrows()]


def score_model(cfg: Config, name: str, data: datasets.Dataset, judge: FindingNet,
                extractors: dict[str, nn.Module | str], train_images: np.ndarray, train_features: np.ndarray,
                thresholds: dict[str, float]) -> pd.DataFrame:
    """Every per-model metric on its evaluation images, as one tidy table (model, prompts, finding, metric, value)."""
    images, truth, sets = images_array(data, cfg.image_size), truth_table(data), prompt_set(data["source"])
    prediction = predict(judge, images)
    tables = []
    for chosen in PROMPT_SETS:
        rows = sets == chosen
        subset, asked = {k: v[rows] for k, v in prediction.items()}, truth[rows].reset_index(drop=True)
        tables.append(alignment_table(subset, asked, model=name, prompts=chosen))
        tables.append(pretrained_alignment_table(extractors["XRV DenseNet"], images[rows], asked, model=name, prompts=chosen))
        if chosen != "test":
            tables.append(controllability_table(subset, asked, model=name, prompts=chosen))
    test_rows = sets == "test"
    real = counterparts(cfg, np.array(data["source"])[test_rows][:: cfg.images_per_prompt])
    tables.append(fid_table(extractors, real, images[test_rows], model=name, prompts="test"))
    tables.append(diversity_table(images[test_rows], list(np.array(data["prompt"])[test_rows]), cfg.seed,
                                  model=name, prompts="test"))
    audit = memorization_audit(images, train_images, prediction["features"], train_features, thresholds)
    tables.append(memorization_summary(audit, model=name, prompts="all"))
    return pd.concat(tables, ignore_index=True)


def real_reference_rows(cfg: Config, real: RealImages, judge: FindingNet, extractors: dict[str, nn.Module | str],
                        vae=None) -> pd.DataFrame:
    """The same metrics on real images: the judges' AUROC on the test set, real diversity, a real-vs-real FID.

    With the base's `vae`, the judge also scores the test set encoded and decoded by it: the ceiling
    of any fine-tune that keeps this VAE frozen (a finding the VAE erases cannot be generated).
    """
    data = {name: real_split(cfg, name) for name in ("test", "validation")}
    test = images_array(data["test"], cfg.image_size)
    validation = images_array(data["validation"], cfg.image_size)
    judged = {"real (judge on test set)": predict(judge, real.test)}
    if vae is not None:
        judged["real through the VAE"] = predict(judge, through_vae(vae, real.test, cfg.image_size))
    return pd.concat([
        *(table(prediction, real.test_truth, model=name, prompts="test")
          for name, prediction in judged.items() for table in (alignment_table, controllability_table)),
        fid_table(extractors, test, validation, model="real (test vs validation)", prompts="test"),
        diversity_table(test, label_groups(truth_table(data["test"])), cfg.seed, model="real (same labels)", prompts="test"),
        pretrained_alignment_table(extractors["XRV DenseNet"], real.test, real.test_truth,
                                   model="real (XRV DenseNet on test set)", prompts="test"),
    ], ignore_index=True)


def ceiling_examples(cfg: Config, real: RealImages, vae, model: Model, finding: str = "Pneumothorax",
                     seeds: tuple[int, ...] = (0, 1)) -> tuple[dict[str, np.ndarray], list[str]]:
    """The autoencoder ceiling as pictures: per side and size of `finding`, a real test image, the same
    image encoded and decoded by the frozen `vae`, and `model`'s images for that side and size.

    Returns grid rows (label -> images) and column titles (the prompts); none, with a warning, when no
    test image has a side and size of `finding`. Of the matching test images
    the one with the fewest other findings is shown, so the finding is what differs.
    """
    truth = real.test_truth
    others = truth[[f for f in FINDINGS if f != finding]].sum(axis=1).to_numpy()
    picks, prompts = [], []
    for size in ("small", "large"):
        for side in ("left", "right"):
            match = np.flatnonzero((truth[f"{finding} side"] == side) & (truth[f"{finding} size"] == size))
            if len(match):
                picks.append(match[others[match].argmin()])
                prompts.append(negated_prompt(finding, side, size))
    if not picks:  # a small test split (the paper smoke's) may hold none: say so, and let 05 go on
        warnings.warn(f"the test set holds no {finding} with a stated side and size to show", stacklevel=2)
        return {}, []
    shown = real.test[picks]
    rows = {"real (test set)": shown,
            "real through the frozen VAE": through_vae(vae, shown, cfg.image_size)}
    settings = SamplingSettings.from_config(cfg)
    for seed in seeds:
        rows[f"{model.name}, seed {seed}"] = generate(model, prompts, [seed] * len(prompts), settings)
    return rows, prompts


# ---------------------------------------------------------------- text-encoder probe and general-domain forgetting

def probe_texts(cfg: Config) -> tuple[list[str], list[str]]:
    """Report texts the probe learns from (training split) and is tested on (test split + evaluation prompts)."""
    data = load_real(cfg)
    held_out = list(data["test"]["prompt"]) + report_language_prompts().prompt.tolist() + list(HELD_OUT_PHRASINGS)
    return list(data["train"]["prompt"]), held_out


def text_probe(cfg: Config, models: dict[str, Model]) -> pd.DataFrame:
    """Linear-probe AUROC per finding on each model's text-encoder embeddings of report text."""
    train_texts, test_texts = probe_texts(cfg)
    train_truth, test_truth = truth_of_reports(train_texts), truth_of_reports(test_texts)
    tables = []
    for name, model in models.items():
        encoder, tokenizer = model.pipe.text_encoder, model.pipe.tokenizer
        tables.append(probe_table(text_embeddings(encoder, tokenizer, train_texts), train_truth,
                                  text_embeddings(encoder, tokenizer, test_texts), test_truth, cfg.seed, model=name))
    return pd.concat(tables, ignore_index=True)


@torch.no_grad()
def general_domain_table(cfg: Config, models: dict[str, Model], scenes: tuple[list, list[str]]) -> pd.DataFrame:
    """Forgetting: each model's denoising loss on general-domain scenes, and how much it relies on their captions.

    "caption reliance" is the loss with captions shuffled between scenes over the loss with the right
    ones, minus one (percent): 0 means the model ignores the text.
    """
    rows = []
    source, n = list_source(*scenes), len(scenes[1])
    shuffled = np.roll(np.arange(n), 1)
    for name, model in models.items():
        pipe = model.pipe
        base = Base(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config))
        pairs = encode_pairs(base, source, cfg.image_size, cache_text=True, folder=cfg.evaluation_path / CACHE_FOLDER,
                             dtype=cfg.latent_dtype, progress=False)
        true_loss = validation_loss(base, pairs, cfg, pipe.device, limit=n)
        shuffled_loss = validation_loss(base, pairs, cfg, pipe.device, limit=n, text_order=shuffled)
        rows += [{"model": name, "prompts": "general domain", "metric": "denoising loss", "value": round(true_loss, 4)},
                 {"model": name, "prompts": "general domain", "metric": "caption reliance (%)",
                  "value": round(100 * (shuffled_loss / true_loss - 1), 2)}]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- downstream augmentation

def downstream_images(cfg: Config, model: Model) -> datasets.Dataset:
    """`downstream_images_per_prompt` images per report-language prompt: what the generator is asked for to
    augment a classifier, every finding spec and normal (cached, resumable)."""
    return generate_dataset(model, cfg.limit(report_language_prompts()), cfg.evaluation_path / "downstream" / model.name,
                            SamplingSettings.from_config(cfg), cfg.downstream_images_per_prompt, cfg.seed + 1, cfg.progress)


def downstream_experiment(cfg: Config, real: RealImages, synthetic: datasets.Dataset) -> pd.DataFrame:
    """Classifier AUROC on the real test set when trained on real only, real + synthetic, synthetic only."""
    images, truth = images_array(synthetic, cfg.image_size), truth_table(synthetic)
    sets = {"real": (real.report_train, real.report_train_truth),
            "real + synthetic": (np.concatenate([real.report_train, images]),
                                 pd.concat([real.report_train_truth, truth], ignore_index=True)),
            "synthetic": (images, truth)}
    return downstream_table(sets, real.test, real.test_truth, number_list(cfg.downstream_seeds, int),
                            epochs=cfg.classifier_epochs, processes=cfg.worker_processes, progress=cfg.progress)


def positives_subset(truth: pd.DataFrame, finding: str, count: int, seed: int) -> np.ndarray:
    """Row indices keeping every image without `finding` and `count` (seeded) of those with it."""
    positive = np.flatnonzero(truth[finding].to_numpy() == 1.0)
    kept = np.random.default_rng(seed).permutation(positive)[:count]
    return np.sort(np.concatenate([np.flatnonzero(truth[finding].to_numpy() != 1.0), kept]))


def learning_curve(cfg: Config, real: RealImages, finding: str = "Pneumothorax", fractions=(0.25, 0.5, 1.0)) -> pd.DataFrame:
    """Test AUROC for `finding` of real-only classifiers trained with a growing share of its real positives."""
    total = int(real.report_train_truth[finding].sum())
    rows = []
    for fraction in fractions:
        count = max(1, round(fraction * total)) if total else 0
        keep = positives_subset(real.report_train_truth, finding, count, cfg.seed)
        net = train_classifier(real.report_train[keep], presence_only(real.report_train_truth.iloc[keep].reset_index(drop=True)),
                               seed=cfg.seed, epochs=cfg.classifier_epochs)
        table = alignment_table(predict(net, real.test), real.test_truth)
        rows.append({"finding": finding, "real positives": count,
                     "AUROC": float(table.set_index("finding").loc[finding, "value"])})
    return pd.DataFrame(rows)


def guidance_table(cfg: Config, model: Model, judge: FindingNet, images_per_prompt: int = 2,
                   spec_images_per_prompt: int = 4) -> pd.DataFrame:
    """At each guidance scale of `guidance_sweep`: fidelity, diversity and control, one row per metric.

    FID (the judge's features) and MS-SSIM of `images_per_prompt` images per test prompt, and the side
    and size correct (`controllability_table`) of `spec_images_per_prompt` images per effusion and
    pneumothorax spec: guidance buys control at the price of fidelity and diversity, and this shows
    at which scale a model draws the asked side before FID rises.
    """
    test = evaluation_prompts(cfg).query("source.str.startswith('test:')")
    specs = cfg.limit(report_language_prompts().query("spec.str.contains('Pleural Effusion|Pneumothorax')"))
    test_jobs, spec_jobs = test.loc[test.index.repeat(images_per_prompt)], specs.loc[specs.index.repeat(spec_images_per_prompt)]
    seeds = [cfg.seed + k for k in range(len(test_jobs) + len(spec_jobs))]
    real, extractor = counterparts(cfg, test.source), ClassifierFeatures(judge)
    spec_truth = truth_of_reports(spec_jobs.prompt)
    rows = []
    for guidance in number_list(cfg.guidance_sweep, float):
        settings = SamplingSettings.from_config(cfg).replace(guidance_scale=guidance)
        images = np.stack([grey(im) for im in generate(model, [*test_jobs.prompt, *spec_jobs.prompt], seeds, settings)])
        drawn, spec_images = images[: len(test_jobs)], images[len(test_jobs) :]
        keys = {"model": model.name, "guidance scale": guidance}
        rows += [{**keys, "metric": "FID (FindingNet (ours))", "value": float(f"{frechet_distance(extractor, real, drawn):.4g}")},
                 {**keys, "metric": "MS-SSIM within group",
                  "value": round(float(diversity_table(drawn, list(test_jobs.prompt), cfg.seed)["value"].iloc[0]), 4)}]
        control = controllability_table(predict(judge, spec_images), spec_truth)
        rows += [{**keys, "metric": f"{finding} {metric.split(' (')[0]}", "value": value}
                 for finding, metric, value in zip(control.finding, control.metric, control.value)]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- results on disk (05 writes, 06 reads)

def save_tables(cfg: Config, tables: dict[str, pd.DataFrame]) -> Path:
    """Write each table as <evaluation>/<name>.csv (atomically) and a sidecar naming the run that made them."""
    out = cfg.evaluation_path
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_file_atomic(out / f"{name}.csv", lambda path, t=table: t.to_csv(path, index=False))
    write_json_atomic(out / "tables.json", {"tables": sorted(tables), "config": cfg.to_dict(), "git": git_state()})
    return out


def load_tables(cfg: Config) -> dict[str, pd.DataFrame]:
    """The tables 05_evaluation saved, by name (a clear error when 05 has not run)."""
    index = cfg.evaluation_path / "tables.json"
    if not index.is_file():
        raise FileNotFoundError(f"no evaluation results in {index.parent}: run 05_evaluation first")
    return {name: pd.read_csv(cfg.evaluation_path / f"{name}.csv") for name in json.loads(index.read_text())["tables"]}


def comparison_table(results: pd.DataFrame) -> pd.DataFrame:
    """The component comparison: one row per model, one column per metric (alignment averaged over findings)."""
    rows = results.copy()
    rows["finding"] = rows.get("finding", pd.Series(index=rows.index, dtype=object)).fillna("")
    rows["column"] = rows.metric + " | " + rows.prompts + rows.finding.map(lambda f: f" | {f}" if f else "")
    return rows.pivot_table(index="model", columns="column", values="value", aggfunc="mean").round(3)


def spec_grid_images(cfg: Config, name: str) -> tuple[list[dict], np.ndarray]:
    """The first evaluation image of `name` for each finding spec (report-language prompts), with the specs."""
    data = datasets.load_from_disk(str(cfg.evaluation_path / "images" / name))
    specs, images = [], []
    for k, (source, spec) in enumerate(zip(data["source"], data["spec"])):
        parsed = json.loads(spec) if spec else {}
        if source == "report language" and "side" in parsed and parsed not in specs:
            specs.append(parsed)
            images.append(np.asarray(data[k]["image"].convert("L")))
    return specs, np.stack(images)


# ---------------------------------------------------------------- one dataset on its own

def presence_by_prompt(data: datasets.Dataset, judge: FindingNet, size: int, prompts: str = "held-out phrasing") -> pd.DataFrame:
    """The judge's mean presence per finding for each prompt of one set, and the findings it asked for.

    An AUROC over a prompt set hides which phrasing failed: this shows whether a model drew a finding
    it was not asked for (a negation read as a mention) or left out one it was asked for.
    """
    data = prompt_set_rows(data, prompts)
    presence = pd.DataFrame(predict(judge, images_array(data, size))["presence"], columns=FINDINGS)
    presence.insert(0, "prompt", data["prompt"])
    table = presence.groupby("prompt", sort=False).mean()
    asked = truth_table(data).assign(prompt=data["prompt"]).groupby("prompt", sort=False)[list(FINDINGS)].max()
    table.insert(0, "asked", ["; ".join(f for f in FINDINGS if asked.loc[p, f] == 1.0) or "none" for p in table.index])
    return table


def confusion_by_prompt_set(data: datasets.Dataset, judge: FindingNet, size: int,
                            prompts: str = "report language") -> pd.DataFrame:
    """The side and size confusion tables of one model's images for one prompt set (`confusion_table`)."""
    data = prompt_set_rows(data, prompts)
    return confusion_table(predict(judge, images_array(data, size)), truth_table(data), prompts=prompts)


def audit_synthetic_dataset(cfg: Config, path: str | Path, judge: FindingNet | None = None) -> pd.DataFrame:
    """The memorization audit of any saved synthetic dataset (an `image` column) against the real training split.

    05's section 6 on its own, for checking a dataset before sharing it. Without a `judge`, one is
    trained as 05 trains it first (about four minutes on the demo profile).
    """
    real = real_images(cfg)
    judge = judge or train_judge(cfg, real, load_model(cfg, "base").pipe.vae)
    images = images_array(datasets.load_from_disk(str(path)), cfg.image_size)
    return memorization_audit(images, real.train, predict(judge, images)["features"], predict(judge, real.train)["features"])
