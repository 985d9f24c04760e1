"""Probe: can the demo model learn to put a finding where its prompt says? (a measurement, not a test)

    make probe-position      # or: .venv/bin/python tests/bench/probe_position_binding.py --steps 300

The side of an effusion or pneumothorax is the demo's least reliable control. This probe strips the
question down: it fine-tunes the demo base (U-Net + text encoder, the demo's training loop) on plain
scenes of one red circle, captioned "... on the left" or "... on the right", then draws both prompts
with the same seeds and reports how often the circle lands on the named side. A control trains the
same captions on a colour task (left -> red, right -> blue, circle on a random side): if colour
follows the words and position does not, the words reach the U-Net and it is the placement that
cannot be steered by text. Builds the demo base first when it is missing (about 10 minutes).

    .venv/bin/python tests/bench/probe_position_binding.py --steps 1500 --zero-terminal-snr --timestep-bias 8

trains with a zero-terminal-SNR schedule and timesteps >= 800 drawn 8x as often, which lets the
prompt decide the side (README, Evaluation); the demo profile fine-tunes with both. Without the flags
the probe trains with Stable Diffusion's own recipe (its schedule, uniform timesteps).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from roentgen_lib import config, models, pretrain, train
from roentgen_lib.data.general import COLOURS, draw_shape

SIDES = {"on the left": 0.28, "on the right": 0.72}  # circle centre, fraction of the width
PROMPT = "a large red circle {side}, on a plain white background"


def scene(rng: np.random.Generator, side: str, task: str, size: int = 64) -> Image.Image:
    """One circle: placed by `side` (task "position") or coloured by it, on a random side (task "colour")."""
    image = Image.new("RGB", (size, size), COLOURS["white"])
    where = side if task == "position" else str(rng.choice(list(SIDES)))
    colour = "red" if task == "position" or side == "on the left" else "blue"
    centre = ((SIDES[where] + rng.uniform(-0.05, 0.05)) * size, (0.5 + rng.uniform(-0.05, 0.05)) * size)
    draw_shape(ImageDraw.Draw(image), "circle", centre, 0.19 * size, COLOURS[colour])
    return image


def train_probe(task: str, count: int, work: Path, **overrides) -> Path:
    """Fine-tune the demo base on `count` scenes of `task` (config `overrides`); return the run folder."""
    seed, steps = overrides["seed"], overrides["max_steps"]
    rng = np.random.default_rng(seed)
    sides = [str(s) for s in rng.choice(list(SIDES), count)]
    images = [scene(rng, side, task) for side in sides]
    prompts = [PROMPT.format(side=side) for side in sides]
    cfg = config.resolve("demo", train_unet=True, train_text_encoder=True, progress=True, batch_size=16,
                         checkpoint_every=steps, validation_every=steps, models_dir=str(work), **overrides)
    held_out = max(1, count // 10)
    train.train_model(cfg, (images[held_out:], prompts[held_out:]), (images[:held_out], prompts[:held_out]),
                      base_path=cfg.base_model_path, run_dir=work / task)
    return work / task


def follows_prompt(run: Path, task: str, seeds: int) -> dict[str, float]:
    """Share of drawings that follow each prompt: circle on the named side, or in the named colour."""
    pipe = models.load_pipeline(config.resolve("demo").base_model_path, run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    shares = {}
    for side, centre in SIDES.items():
        images = pipe([PROMPT.format(side=side)] * seeds, num_inference_steps=20, guidance_scale=4.0, output_type="np",
                      generator=[torch.Generator().manual_seed(k) for k in range(seeds)]).images
        red = (images[..., 0] > 0.6) & (images[..., 2] < 0.45)
        blue = (images[..., 2] > 0.6) & (images[..., 0] < 0.45)
        if task == "position":
            columns = np.arange(images.shape[2]) / images.shape[2]
            x = (red * columns).sum(axis=(1, 2)) / np.maximum(red.sum(axis=(1, 2)), 1)
            hits = (red.sum(axis=(1, 2)) > 0) & ((x < 0.5) == (centre < 0.5))
        else:
            hits = (red.sum(axis=(1, 2)) > blue.sum(axis=(1, 2))) == (side == "on the left")
        shares[side] = float(hits.mean())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per task (batch 16)")
    parser.add_argument("--images", type=int, default=1200, help="scenes per task")
    parser.add_argument("--seeds", type=int, default=16, help="drawings per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero-terminal-snr", action="store_true", help="train with a zero-terminal-SNR schedule")
    parser.add_argument("--timestep-bias", type=float, default=1.0, help="weight of timesteps >= 800 (1: uniform)")
    args = parser.parse_args()
    overrides = {"max_steps": args.steps, "seed": args.seed, "zero_terminal_snr": args.zero_terminal_snr,
                 "timestep_bias": args.timestep_bias}
    torch.set_num_threads(2)
    pretrain.build_base(config.resolve("demo"))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for task in ("position", "colour"):
            run = train_probe(task, args.images, Path(work), **overrides)
            for side, share in follows_prompt(run, task, args.seeds).items():
                rows.append({"task": task, "prompt says": side, "follows the prompt": share})
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"({args.steps} steps of 16, {args.images} scenes, {args.seeds} drawings per prompt, zero terminal SNR "
          f"{args.zero_terminal_snr}, timestep bias {args.timestep_bias}; 0.5 = chance)")


if __name__ == "__main__":
    main()
