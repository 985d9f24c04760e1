"""Tiny SD components, loading a base from a local folder, the text-encoder override, the general domain."""

import json
import shutil

import numpy as np
import pytest
import torch

from roentgen_lib import models
from roentgen_lib.data.general import render_scene
from roentgen_lib.text.tokenizer import VOCAB_SIZE


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    models.build_components("tiny", 32, seed=0).pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_tiny_components_have_sd_structure():
    base = models.build_components("tiny", 32, seed=0)
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size == 32
    assert base.text_encoder.config.vocab_size == len(base.tokenizer) == VOCAB_SIZE
    latents = base.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8) and base.unet.config.sample_size == 8


def test_general_domain_scenes_are_deterministic_and_captioned():
    image, caption = render_scene(np.random.default_rng(3), 64)
    again, same = render_scene(np.random.default_rng(3), 64)
    assert image.size == (64, 64) and caption == same and np.array_equal(np.asarray(image), np.asarray(again))
    assert " background" in caption and any(s in caption for s in ("circle", "square", "triangle", "ring", "cross"))


def test_load_base_reads_a_local_diffusers_folder(tiny_base_dir):
    base = models.load_base(str(tiny_base_dir))
    assert type(base.unet).__name__ == "UNet2DConditionModel"
    assert base.tokenizer("large left pleural effusion").input_ids[0] == 49406
    assert not list(tiny_base_dir.rglob("*.bin")), "weights are saved as safetensors only"


def test_load_base_names_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        models.load_base(str(tmp_path))


def test_text_encoder_override_projects_to_cross_attention(tiny_base_dir, text_model_dir, tmp_path):
    base = models.load_base(str(tiny_base_dir), text_encoder=str(text_model_dir))
    ids = base.tokenizer(["large left pleural effusion"], padding="max_length", max_length=77, return_tensors="pt")
    states = base.text_encoder(ids.input_ids)[0]
    assert states.shape == (1, 77, base.unet.config.cross_attention_dim)
    torch.rand(3)  # whatever drew random numbers before, a new projection starts from its seed's weights
    assert torch.equal(models.load_base(str(tiny_base_dir), text_encoder=str(text_model_dir)).text_encoder(ids.input_ids)[0], states)
    other = models.load_base(str(tiny_base_dir), text_encoder=str(text_model_dir), seed=1).text_encoder(ids.input_ids)[0]
    assert not torch.equal(other, states)
    saved = tmp_path / "saved"
    models.save_base(base, saved)
    again = models.load_base(str(saved))
    assert torch.equal(again.text_encoder(ids.input_ids)[0], states)
    image = again.pipeline()("no effusion", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def padding_leaves_the_prompt_unchanged(base: models.Base) -> bool:
    """The prompt's token states are the same alone and padded to 77 tokens."""
    prompt = ["no large left pleural effusion"]
    short = base.tokenizer(prompt, return_tensors="pt").input_ids
    padded = base.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        alone, with_padding = base.text_encoder(short)[0], base.text_encoder(padded)[0]
    return torch.allclose(with_padding[:, : short.shape[1]], alone, atol=1e-6)


def test_text_encoder_override_reads_77_tokens_and_ignores_padding(tiny_base_dir, text_model_dir):
    base = models.load_base(str(tiny_base_dir), text_encoder=str(text_model_dir))
    assert base.tokenizer.model_max_length == 77  # Stable Diffusion's context, not the encoder's 512
    assert padding_leaves_the_prompt_unchanged(base)


def test_text_encoder_override_masks_the_tokenizers_padding_and_can_checkpoint(tiny_base_dir, text_model_dir, tmp_path):
    """A model config may name another pad id than its tokenizer pads with (CLIP's configs say 1)."""
    shutil.copytree(text_model_dir, tmp_path / "bert")
    settings = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**settings, "pad_token_id": 5}))  # 5 is "large"
    base = models.load_base(str(tiny_base_dir), text_encoder=str(tmp_path / "bert"))
    assert padding_leaves_the_prompt_unchanged(base)
    base.text_encoder.activation_checkpointing_enable()  # what training calls with gradient_checkpointing=True
    assert base.text_encoder.encoder.is_activation_checkpointing


def test_pretrained_vae_gets_a_unit_variance_scaling_factor():
    base = models.build_components("tiny", 32, seed=0)
    losses = models.pretrain_vae(base.vae, 32, steps=3, batch_size=4, seed=0, progress=False)
    assert len(losses) == 3 and base.vae.config.scaling_factor != 0.18215
    scenes = models.images_to_tensor([render_scene(np.random.default_rng(7), 32)[0] for _ in range(128)], 32)
    with torch.no_grad():
        scaled = base.vae.encode(scenes).latent_dist.mean * base.vae.config.scaling_factor
    assert 0.8 < scaled.std().item() < 1.25  # other scenes than those measured: unit variance generalises


def test_fused_adamw_only_where_torch_has_the_kernel():
    assert models.fused_adamw_available([torch.nn.Parameter(torch.zeros(2))])
    assert not models.fused_adamw_available([torch.nn.Parameter(torch.zeros(2, device="meta"))])


def test_random_crops_are_windows_of_each_image_at_every_corner():
    batch = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).reshape(64, 3, 8, 8)
    crops = models.random_crops(batch, 4, np.random.default_rng(0))
    assert crops.shape == (64, 3, 4, 4)
    corners = set()
    for k, (image, patch) in enumerate(zip(batch, crops)):
        y, x = divmod(int(patch[0, 0, 0].item()) - k * 3 * 64, 8)  # the patch's top-left pixel in its own image
        assert torch.equal(patch, image[:, y : y + 4, x : x + 4])
        corners.add((y, x))
    assert {y for y, _ in corners} == {x for _, x in corners} == set(range(5))  # every offset 0..8-4 is drawn


def test_autoencoder_pretraining_on_crops_sees_patches_and_scales_on_whole_scenes():
    base = models.build_components("tiny", 32, seed=0)
    seen = []
    base.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    losses = models.pretrain_vae(base.vae, 32, steps=2, batch_size=4, seed=0, progress=False, crop=16)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert seen == [(4, 3, 16, 16), (4, 3, 16, 16), (models.SCALING_SCENES, 3, 32, 32)]  # two steps, then the scaling


def test_pickled_weights_are_refused_with_the_reason(tiny_base_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_base_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # the bytes never get unpickled: the name alone is refused
    with pytest.raises(models.WeightsError, match=r"unet/diffusion_pytorch_model.bin is a pickled weight file.*unpickling"):
        models.load_base(str(folder))


def test_a_pickled_lora_adapter_is_refused(tiny_base_dir, tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.bin").write_bytes(b"not unpickled: the name alone is refused")
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    with pytest.raises(models.WeightsError, match=r"pytorch_lora_weights.bin is a pickled weight file"):
        models.load_pipeline(str(tiny_base_dir), tmp_path / "lora")
    assert diffusers_logging.get_verbosity() == before  # a refused adapter leaves diffusers' logging as it was


def test_truncated_weights_name_the_file(tiny_base_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_base_dir, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"vae/diffusion_pytorch_model.safetensors"):
        models.load_base(str(folder))


def test_components_of_another_architecture_are_named(tiny_base_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_base_dir, folder)
    shutil.rmtree(folder / "unet")
    models.build_components("demo", 64, seed=0).unet.save_pretrained(folder / "unet", safe_serialization=True)
    with pytest.raises(models.WeightsError, match=r"mixed: components from different architectures.*text encoder is 32 wide"):
        models.load_base(str(folder))


def test_a_lora_adapter_for_another_base_is_named(tiny_base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from roentgen_lib import train

    other = models.build_components("demo", 64, seed=0)
    train.add_lora(other.unet, 4, 4, "to_q,to_k,to_v,to_out.0")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(other.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True)
    with pytest.raises(models.WeightsError, match=r"LoRA adapter .*lora does not fit the base .*size mismatch"):
        models.load_pipeline(str(tiny_base_dir), tmp_path / "lora")
