"""Benchmark: our batched sampler against a plain StableDiffusionPipeline call loop, same model and prompts.

    make bench-sample     # or: .venv/bin/python tests/bench/bench_sample.py [--images 64] [--repeats 3]

Target: ours is never slower than the plain loop and faster where batching helps. A benchmark, not
a test: it reports, it asserts nothing. About 3 minutes on 2 idle cores; the table is also written
to data/bench/bench_sample.md.

Both sides use one demo-architecture tiny Stable Diffusion (`pretrain.build_components("demo", 64,
seed=0)`, untrained: cost does not depend on the weights), the same prompts (the four validation
prompts repeated), one seed per image, DPM-Solver++ with 20 steps and guidance 4, in this process
with torch's default 2 threads. The plain loop is what a diffusers user writes: one
`pipe(prompt, generator=torch.Generator().manual_seed(seed), ...)` call per image, PIL output. Ours
is `sample.generate` at several batch sizes. Sides alternate; the table gives the median images/s
over the repeats and the ratio to the plain loop. The first images of both sides are compared, to
show they draw the same pictures (batch size 1 is bit-identical to the plain call).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from roentgen_lib import config, pretrain, sample

STEPS, GUIDANCE = 20, 4.0


def plain_loop(pipe, prompts: list[str], seeds: list[int]) -> list:
    """One pipeline call per image, as in diffusers' documentation."""
    return [pipe(p, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(s)).images[0] for p, s in zip(prompts, seeds)]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8,16,64")
    args = parser.parse_args()
    cfg = config.resolve("demo")
    pipe = pretrain.build_components("demo", 64, seed=0).pipeline()
    pipe.set_progress_bar_config(disable=True)
    sample.use_scheduler(pipe, "dpmsolver++")
    model = sample.Model("untrained demo architecture", pipe, "-", "built in memory")
    prompts = (cfg.prompts_for_validation * args.images)[: args.images]
    seeds = list(range(args.images))
    batch_sizes = config.number_list(args.batch_sizes, int)
    rates: dict[str, list[float]] = {"plain loop": [], **{f"ours, batch {b}": [] for b in batch_sizes}}
    plain_loop(pipe, prompts[:2], seeds[:2])  # warm-up
    for _ in range(args.repeats):
        seconds, plain_images = timed(lambda: plain_loop(pipe, prompts, seeds))
        rates["plain loop"].append(args.images / seconds)
        for b in batch_sizes:
            settings = sample.SamplingSettings("dpmsolver++", STEPS, GUIDANCE, "", b)
            seconds, ours = timed(lambda: sample.generate(model, prompts, seeds, settings))
            rates[f"ours, batch {b}"].append(args.images / seconds)
            difference = np.abs(ours[0].astype(int) - np.asarray(plain_images[0]).astype(int)).max()
            print(f"batch {b}: {args.images / seconds:.1f} img/s; first image differs from the plain call by "
                  f"at most {difference} grey levels", flush=True)
        print(f"plain loop: {rates['plain loop'][-1]:.1f} img/s", flush=True)
    reference = statistics.median(rates["plain loop"])
    rows = [f"| {name} | {statistics.median(r):.2f} | {min(r):.2f}-{max(r):.2f} | {statistics.median(r) / reference:.2f}x |"
            for name, r in rates.items()]
    text = "\n".join(["| sampler | images/s (median) | range | vs plain loop |", "|---|---|---|---|", *rows])
    print(text)
    out = Path(config.project_path("data/bench"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sample.md").write_text(
        f"{args.images} images, DPM-Solver++ {STEPS} steps, guidance {GUIDANCE}, demo architecture at 64 px, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats\n\n{text}\n")


if __name__ == "__main__":
    main()
