"""Sample from the base or a fine-tuned model (04_sampling), in three files:

- `pipelines`: load a model (`load_model`) and draw text-to-image (`generate`), with seeded, fixed batches;
- `edits`: counterfactual edits, inpainting and outpainting;
- `synthetic`: synthetic datasets of N images per prompt, resumable and split over processes by rank.

Every image is drawn from its own seeded generator, so a (model, prompt, seed, settings) tuple names
one image. Bad input raises `SamplingError` naming the problem before diffusers is called.

Usage::

    cfg = config.resolve("demo")
    model = sample.load_model(cfg, "full_unet_te")          # "base", "lora_unet", ... (see available_models)
    images = sample.generate(model, ["large left pleural effusion"], [0], sample.SamplingSettings.from_config(cfg))
"""

from roentgen_lib.sample.edits import (
    edit, check_mask, inpaint, outpaint_canvas, outpaint, edit_identity)
from roentgen_lib.sample.pipelines import (
    SCHEDULERS, SCHEDULER_OPTIONS, RUN_OUTPUTS, SamplingError, SamplingSettings, Model, available_models,
    model_fingerprint, load_model, use_scheduler, check_prompts, check_seeds, run_pipeline, quiet_libraries,
    generate, pipeline_as, compare_models, sweep, model_table, as_rgb, grey)

__all__ = [
    'Model', 'RUN_OUTPUTS', 'SCHEDULERS', 'SCHEDULER_OPTIONS', 'SamplingError',
    'SamplingSettings', 'as_rgb', 'available_models', 'check_mask', 'check_prompts', 'check_seeds',
    'compare_models', 'edit', 'edit_identity', 'generate', 'grey', 'inpaint', 'load_model',
    'model_fingerprint', 'model_table', 'outpaint', 'outpaint_canvas', 'pipeline_as',
    'quiet_libraries', 'run_pipeline', 'sweep', 'use_scheduler']
