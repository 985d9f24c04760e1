"""Fine-tune a Stable Diffusion base on image/prompt pairs: U-Net, text encoder or both, full or LoRA.

One loop serves every combination and every profile. What users of diffusers' and kohya's training
scripts expect is here: accelerate (one process, or many through `accelerate launch`), mixed
precision, gradient accumulation and checkpointing, EMA, Min-SNR weighting, noise offset, warm-up
schedules, 8-bit Adam (bitsandbytes), gradient clipping, caption dropout for classifier-free guidance.
VAE latents are encoded once into shards on disk (and text-encoder outputs too when the text encoder
is frozen; see `latents`), so each step runs only what it trains and no split is held in memory.
Checkpoints (see `checkpoints`) resume to the same bits on CPU.

- `latents`: pairs encoded once into memory-mapped shards (latents, tokens, frozen text states);
- `loss`: the denoising loss, timestep draws, noise schedules and the held-out validation loss;
- `loop`: the training loop (`finetune`, `train_model`), what trains, the optimizer, the outputs;
- `resume`: which checkpoints a run may continue, runs set aside, the run's log;
- `variants`: launching a run over several processes (GPUs), and 03's component variants side by side.

What evaluation reads of training (encoded pairs for the forgetting measure, the held-out loss) is
exported here, so it does not reach into the package's files.

Usage::

    cfg = config.resolve("demo", method="lora", train_text_encoder=True)
    result = finetune(cfg)

"""

from roentgen_lib.train.latents import CACHE_FOLDER, encode_pairs, list_source
from roentgen_lib.train.loop import (TrainResult, add_lora, batch_indices, epoch_rows, finetune,
                                     fused_adamw_available, main, train_model, training_rows)
from roentgen_lib.train.loss import validation_loss
from roentgen_lib.train.resume import logged_step
from roentgen_lib.train.variants import launch, train_runs, variant_configs

__all__ = ["CACHE_FOLDER", "TrainResult", "add_lora", "batch_indices", "epoch_rows", "finetune", "fused_adamw_available",
           "encode_pairs", "launch", "list_source", "logged_step", "main", "train_model", "train_runs",
           "training_rows", "validation_loss", "variant_configs"]
