"""The project's base: tiny SD architectures and Stable Diffusion's published ones, autoencoder pretraining, scenes."""

import numpy as np
import pytest
import torch

from roentgen_lib import models, pretrain
from roentgen_lib.data.general import render_scene
from roentgen_lib.text.tokenizer import VOCAB_SIZE


def test_tiny_components_have_sd_structure():
    base = pretrain.build_components("tiny", 32, seed=0)
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size == 32
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) == VOCAB_SIZE
    latents = base.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8) and base.unet.config.sample_size == 8


def test_general_domain_scenes_are_deterministic_and_captioned():
    image, caption = render_scene(np.random.default_rng(3), 64)
    again, same = render_scene(np.random.default_rng(3), 64)
    assert image.size == (64, 64) and caption == same and np.array_equal(np.asarray(image), np.asarray(again))
    assert " background" in caption and any(s in caption for s in ("circle", "square", "triangle", "ring", "cross"))


def test_pretrained_vae_gets_a_unit_variance_scaling_factor():
    base = pretrain.build_components("tiny", 32, seed=0)
    losses = pretrain.pretrain_vae(base.vae, 32, steps=3, batch_size=4, seed=0, progress=False)
    assert len(losses) == 3 and base.vae.config.scaling_factor != 0.18215
    scenes = models.images_to_tensor([render_scene(np.random.default_rng(7), 32)[0] for _ in range(128)], 32)
    with torch.no_grad():
        scaled = base.vae.encode(scenes).latent_dist.mean * base.vae.config.scaling_factor
    assert 0.8 < scaled.std().item() < 1.25  # other scenes than those measured: unit variance generalises


def test_random_crops_are_windows_of_each_image_at_every_corner():
    batch = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).reshape(64, 3, 8, 8)
    crops = pretrain.random_crops(batch, 4, np.random.default_rng(0))
    assert crops.shape == (64, 3, 4, 4)
    corners = set()
    for k, (image, patch) in enumerate(zip(batch, crops)):
        y, x = divmod(int(patch[0, 0, 0].item()) - k * 3 * 64, 8)  # the patch's top-left pixel in its own image
        assert torch.equal(patch, image[:, y : y + 4, x : x + 4])
        corners.add((y, x))
    assert {y for y, _ in corners} == {x for _, x in corners} == set(range(5))  # every offset 0..8-4 is drawn


def test_autoencoder_pretraining_on_crops_sees_patches_and_scales_on_whole_scenes():
    base = pretrain.build_components("tiny", 32, seed=0)
    seen = []
    base.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    losses = pretrain.pretrain_vae(base.vae, 32, steps=2, batch_size=4, seed=0, progress=False, crop=16)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert seen == [(4, 3, 16, 16), (4, 3, 16, 16), (pretrain.SCALING_SCENES, 3, 32, 32)]  # two steps, then the scaling


@pytest.mark.parametrize("version, size, counts, prediction", [
    ("sd-1.5", 512, (859_520_964, 83_653_863, 123_060_480), "epsilon"),
    ("sd-2.1", 768, (865_910_724, 83_653_863, 340_387_840), "v_prediction"),
])
def test_stable_diffusion_is_built_to_its_published_architecture(version, size, counts, prediction):
    """The parameter counts of the released U-Net, VAE and text encoder (built on the meta device: no memory)."""
    with torch.device("meta"):
        base = pretrain.build_components(version, size, seed=0)
    assert tuple(sum(p.numel() for p in m.parameters()) for m in (base.unet, base.vae, base.text_encoder)) == counts
    assert base.unet.config.sample_size == size // 8 and base.noise_scheduler.config.prediction_type == prediction
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
