"""Counterfactual edits (image-to-image), inpainting and outpainting with a loaded model: the same
components in diffusers' other Stable Diffusion pipelines. Sampling takes images; the phantom cases 04
edits come from `data.edit_cases`.

A mask of the wrong size or kind raises `SamplingError` naming the image it belongs to.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from roentgen_lib.sample.pipelines import Model, SamplingError, SamplingSettings, as_rgb, grey, pipeline_as, run_pipeline


def edit(model: Model, images: list, prompts: list[str], seeds: list[int], settings: SamplingSettings,
         strength: float = 0.7) -> np.ndarray:
    """Counterfactual edit (image-to-image): re-draw each image towards its prompt.

    `strength` is how far back into the noise the image is pushed before re-drawing: 0 returns it,
    1 ignores it. Only `strength * steps` denoising steps run.
    """
    if not 0.0 < strength <= 1.0:
        raise SamplingError(f"strength must be in (0, 1], got {strength}")
    if int(settings.steps * strength) < 1:
        raise SamplingError(f"strength {strength} x {settings.steps} steps leaves no denoising step; "
                            "raise strength or steps")
    if len(images) != len(prompts):
        raise SamplingError(f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    pipe = pipeline_as(StableDiffusionImg2ImgPipeline, model.pipe)
    return run_pipeline(pipe, model, prompts, seeds, settings, image=[as_rgb(im) for im in images], strength=strength)


def check_mask(mask: np.ndarray, image: Image.Image, k: int) -> np.ndarray:
    """A binary mask (True = redraw) the size of its image, or a SamplingError saying what differs."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != (image.height, image.width):
        raise SamplingError(f"mask {k} has shape {mask.shape} but its image is {image.height}x{image.width}; "
                            "give a 2-D mask of the image's size (True or 255 where to redraw)")
    return mask > (127 if mask.dtype == np.uint8 else 0.5)


def inpaint(model: Model, images: list, masks: list[np.ndarray], prompts: list[str], seeds: list[int],
            settings: SamplingSettings, keep_outside: bool = True) -> np.ndarray:
    """Redraw the masked region of each image from its prompt (the model need not be an inpainting model).

    The U-Net has 4 input channels, so diffusers blends: at every step the unmasked latents are
    reset to the (noised) original, and only the masked region is generated. Outside the mask the
    VAE's reconstruction would blur the original slightly; `keep_outside` pastes the original back.
    """
    if not len(images) == len(masks) == len(prompts):
        raise SamplingError(f"got {len(images)} images, {len(masks)} masks and {len(prompts)} prompts; "
                            "give one mask and one prompt per image")
    rgb = [as_rgb(im) for im in images]
    binary = [check_mask(m, im, k) for k, (m, im) in enumerate(zip(masks, rgb))]
    pipe = pipeline_as(StableDiffusionInpaintPipeline, model.pipe)
    size = rgb[0].height
    out = run_pipeline(pipe, model, prompts, seeds, settings, image=rgb,
                       mask_image=[Image.fromarray(b.astype(np.uint8) * 255) for b in binary],
                       strength=1.0, height=size, width=size)
    if keep_outside:
        out = np.stack([np.where(b[..., None], o, np.asarray(im)) for o, b, im in zip(out, binary, rgb)])
    return out


def outpaint_canvas(image: Image.Image | np.ndarray, scale: float) -> tuple[Image.Image, np.ndarray]:
    """Shrink an image to `scale` of its side, centred on a canvas of the original size; mask = the border."""
    if not 0.2 <= scale < 1.0:
        raise SamplingError(f"scale must be in [0.2, 1), got {scale}")
    rgb = as_rgb(image)
    inner = max(8, round(rgb.width * scale))
    offset = (rgb.width - inner) // 2
    fill = tuple(int(v) for v in np.asarray(rgb).reshape(-1, 3).mean(axis=0))
    canvas = Image.new("RGB", rgb.size, fill)
    canvas.paste(rgb.resize((inner, inner), Image.Resampling.LANCZOS), (offset, offset))
    mask = np.ones((rgb.height, rgb.width), bool)
    mask[offset : offset + inner, offset : offset + inner] = False
    return canvas, mask


def outpaint(model: Model, images: list, prompts: list[str], seeds: list[int], settings: SamplingSettings,
             scale: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Extend each image beyond its borders: shrink it into the centre, then inpaint the border.

    Returns the outpainted images and the canvases they started from (uint8, N x H x W x 3).
    """
    canvases, masks = zip(*(outpaint_canvas(im, scale) for im in images))
    out = inpaint(model, list(canvases), list(masks), prompts, seeds, settings)
    return out, np.stack([np.asarray(c) for c in canvases])


def edit_identity(originals: np.ndarray, edited: np.ndarray, regions: list[np.ndarray]) -> pd.DataFrame:
    """How much each edit changed the image inside the edited region and outside it (grey levels).

    A good counterfactual edit changes the named region and keeps the patient elsewhere: outside
    change small next to inside change.
    """
    rows = []
    for original, new, region in zip(originals, edited, regions):
        diff = np.abs(grey(new).astype(float) - grey(original).astype(float))
        rows.append({"MAE inside region": round(float(diff[region].mean()), 2),
                     "MAE outside region": round(float(diff[~region].mean()), 2),
                     "outside / inside": round(float(diff[~region].mean() / max(diff[region].mean(), 1e-9)), 3)})
    return pd.DataFrame(rows)
