"""The paper_smoke report: seconds per step and peak memory of every fine-tuning variant, and a stock-diffusers load.

`make smoke-paper` runs notebooks 01-06 on the paper_smoke profile (Stable Diffusion 1.5's architecture
with random weights, a MIMIC-CXR-format tree, 512 px), then this. It proves that the paper path's code
runs and what it costs per step; the images it draws are noise by design.

    python -m roentgen_lib.smoke                 # after the paper_smoke runs; writes data/paper_smoke/smoke.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from roentgen_lib.config import Config, relative, resolve
from roentgen_lib.files import write_json_atomic

FLOAT32_BYTES = 4
# Bytes of training state per trained weight with AdamW in mixed precision: fp32 master weight, its
# gradient and AdamW's two moments; an EMA adds one more fp32 copy.
TRAINING_STATE_BYTES = {"AdamW": 4 * FLOAT32_BYTES, "EMA": FLOAT32_BYTES}


def variant_table(cfg: Config) -> pd.DataFrame:
    """One row per finished run of the profile: what it trained, seconds per step, peak memory and state sizes."""
    rows = []
    for record_file in sorted(cfg.models_path.glob("*/run.json")):
        record = json.loads(record_file.read_text())
        run = record["config"]
        trained = int(record.get("trainable_parameters", 0))
        rows.append({
            "run": record_file.parent.name, "method": run["method"],
            "trains": " + ".join(name for name, on in (("U-Net", run["train_unet"]), ("text encoder", run["train_text_encoder"])) if on),
            "image px": run["image_size"], "batch": run["batch_size"] * run["gradient_accumulation"] * record["processes"],
            "steps": record["steps"], "s/step": round(record["seconds_per_step"], 1),
            "peak memory GB": round(record["peak_memory_mb"] / 1024, 2), "trained weights M": round(trained / 1e6, 1),
            "AdamW state GB": round(trained * TRAINING_STATE_BYTES["AdamW"] / 2**30, 2),
            "EMA": f"{run['ema_decay']}" if run["ema_decay"] else
                   f"off here (+{trained * TRAINING_STATE_BYTES['EMA'] / 2**30:.2f} GB with it)"})
    return pd.DataFrame(rows)


def stock_render(pipeline_dir: Path, size: int, steps: int = 2, prompt: str = "small left pleural effusion") -> dict:
    """Load a saved full fine-tune with stock `StableDiffusionPipeline.from_pretrained` and draw one image."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, height=size, width=size, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return {"pipeline": relative(pipeline_dir), "prompt": prompt, "steps": steps, "image_size": list(image.size),
            "seconds": round(time.perf_counter() - started, 1)}


def report(cfg: Config) -> dict:
    """The variant table and the stock-diffusers render of the first full fine-tune, written beside the runs."""
    table = variant_table(cfg)
    if table.empty:
        raise FileNotFoundError(f"no finished runs in {relative(cfg.models_path)}: run the {cfg.profile} notebooks first "
                                "(make smoke-paper)")
    full = sorted(p.parent for p in cfg.models_path.glob("*/pipeline/model_index.json"))
    result = {"variants": table.to_dict(orient="records"),
              "stock_diffusers": stock_render(full[0], cfg.image_size) if full else None}
    write_json_atomic(cfg.models_path.parent / "smoke.json", result)
    return result


def markdown(table: pd.DataFrame) -> str:
    """A table as GitHub markdown (for docs/paper_scale.md)."""
    rows = [list(table.columns), ["---"] * len(table.columns), *table.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print the table and the render check."""
    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="paper_smoke")
    args = parser.parse_args(argv)
    result = report(resolve(args.profile))
    print(markdown(pd.DataFrame(result["variants"])))
    print("stock StableDiffusionPipeline.from_pretrained:", json.dumps(result["stock_diffusers"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
