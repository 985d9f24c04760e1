"""Benchmark: peak memory of training, synthetic generation and evaluation at N and 8N dataset images.

    make bench-scale      # or: .venv/bin/python tests/bench/bench_scale.py [--n 2000]

Memory must stay flat in the size of the dataset: 8x the images may cost at most 15% more peak
resident memory in each stage. The model is the tiny architecture at 64 px with random weights, so
the data, not the model, would dominate memory if a stage held a split (64 px, not 128: encoding 16,000
images at 128 px in VAE batches of 4 takes over 20 minutes on 2 cores). A benchmark, not a test: it
reports (and exits 1 when a stage grows by 15% or more); about 10 minutes on 2 cores.

Each measurement is its own subprocess (this script in worker mode, `--stage`), which reports its
peak resident set size (VmHWM) and wall time:
- train: `train.finetune` for 4 steps of 16 images on the whole training split (its latents and
  tokens encoded into memory-mapped shards first, as in every run);
- synthetic: `synthetic.generate_dataset` of N and 8N images (1 sampling step, batches of 64);
- evaluate: `experiments.real_images` (the judge's training set and the test set, at most
  `eval_real_images` = N per split), the judge trained for one epoch, and its test predictions.

Beside each 8N row stands what the in-memory design before streaming would have held in addition
for the 7N extra images: every image decoded (RGB), every fp32 latent and every fp32 text state.
Writes the table to data/bench/bench_scale.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "data" / "bench" / "scale"
SIZE = 64
GROWTH_LIMIT = 1.15
PROMPTS = ["moderate cardiomegaly", "large left pleural effusion", "small right pneumothorax", "mild pulmonary edema",
           "no acute cardiopulmonary process"]


def stage_config(images: int, n: int):
    """The tiny profile at 64 px on a phantom dataset of `images` images (composed reports fill the draw)."""
    from roentgen_lib import config

    return config.resolve("tiny", image_size=SIZE, n_images=images, composed_reports=images, progress=False,
                          output_dir=str(OUT / f"dataset-{images}"), base_model=str(OUT / "base"),
                          models_dir=str(OUT / f"models-{images}"), evaluation_dir=str(OUT / f"evaluation-{images}"),
                          synthetic_dir=str(OUT / f"synthetic-{images}"), eval_real_images=n, classifier_epochs=1,
                          max_steps=4, batch_size=16, checkpoint_every=1000, validation_every=1000,
                          validation_images=False, sampling_steps=1, sample_batch_size=64)


def prepare(images: int, n: int) -> None:
    """The untrained 64 px tiny base (once) and the phantom dataset of `images` images."""
    from roentgen_lib import models, pretrain
    from roentgen_lib.data import dataset

    if not (OUT / "base" / "model_index.json").is_file():
        models.save_base(pretrain.build_components("tiny", SIZE, seed=0), OUT / "base")
    cfg = stage_config(images, n)
    if not (cfg.dataset_path / dataset.MANIFEST).is_file():
        dataset.build_dataset(cfg)


def run_stage(stage: str, images: int, n: int) -> None:
    """Worker mode: run one stage on the dataset of `images` images."""
    from roentgen_lib import experiments, sample, train
    from roentgen_lib.sample import synthetic

    cfg = stage_config(images, n)
    if stage == "train":
        train.finetune(dataclasses.replace(cfg, resume=False))
    elif stage == "synthetic":
        model = sample.load_model(cfg, "base")
        synthetic.generate_dataset(model, synthetic.list_prompts(PROMPTS), cfg.synthetic_path,
                                   sample.SamplingSettings.from_config(cfg), images // len(PROMPTS), cfg.seed, False)
    elif stage == "evaluate":
        from roentgen_lib.evaluate import predict

        real = experiments.real_images(cfg)
        predict(experiments.train_judge(cfg, real, None), real.test)


def peak_rss_mb() -> float:
    """This process's peak resident set size."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure(stage: str, images: int, n: int) -> dict:
    """Run a stage in its own process; its peak memory and wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--stage", stage, "--images", str(images), "--n", str(n)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{stage} at {images} images failed:\n{done.stderr[-3000:]}")
    return {"stage": stage, "images": images, "peak_mb": json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"],
            "seconds": round(time.perf_counter() - started, 1)}


def in_memory_extra_mb(extra_images: int) -> float:
    """What the in-memory design held per extra image: decoded RGB image, fp32 latent, fp32 text states."""
    from roentgen_lib.pretrain import TINY_ARCHITECTURES
    from roentgen_lib.text.tokenizer import CONTEXT_LENGTH

    width = TINY_ARCHITECTURES["tiny"]["text_width"]
    per_image = SIZE * SIZE * 3 + 4 * (SIZE // 8) ** 2 * 4 + CONTEXT_LENGTH * width * 4
    return extra_images * per_image / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="N: the smaller dataset (8N is the larger)")
    parser.add_argument("--stage", choices=("train", "synthetic", "evaluate"), default=None)
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    if args.stage:  # worker mode
        prepare(args.images, args.n)
        run_stage(args.stage, args.images, args.n)
        print(json.dumps({"peak_mb": peak_rss_mb()}))
        return 0
    sizes = (args.n, 8 * args.n)
    for images in sizes:  # built first, so that no stage's peak includes building the data
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                        f"import bench_scale; bench_scale.prepare({images}, {args.n})"], check=True)
    rows = [measure(stage, images, args.n) for stage in ("train", "synthetic", "evaluate") for images in sizes]
    lines = ["| stage | images | peak RSS (MB) | growth N -> 8N | wall (s) | in-memory design: extra for 8N (MB) |",
             "|---|---|---|---|---|---|"]
    failed = []
    for small, large in zip(rows[::2], rows[1::2]):
        growth = large["peak_mb"] / small["peak_mb"]
        failed += [small["stage"]] if growth >= GROWTH_LIMIT else []
        lines.append(f"| {small['stage']} | {small['images']} | {small['peak_mb']:.0f} | | {small['seconds']} | |")
        lines.append(f"| {large['stage']} | {large['images']} | {large['peak_mb']:.0f} | x{growth:.3f} | {large['seconds']} | "
                     f"+{in_memory_extra_mb(large['images'] - small['images']):.0f} |")
    table = "\n".join(lines)
    print(table)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    (OUT.parent / "bench_scale.md").write_text(table + "\n")
    if failed:
        print(f"grew by {GROWTH_LIMIT - 1:.0%} or more: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
