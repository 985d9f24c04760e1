"""Loading a base (a local folder or the hub's cache), refusing what must not load, the text-encoder override."""

import json
import shutil

import huggingface_hub
import pytest
import torch

from roentgen_lib import config, models, pretrain


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    pretrain.build_components("tiny", 32, seed=0).pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_load_base_reads_a_local_diffusers_folder(tiny_base_dir):
    base = models.load_base(str(tiny_base_dir))
    assert type(base.unet).__name__ == "UNet2DConditionModel"
    assert base.tokenizer("large left pleural effusion").input_ids[0] == 49406
    assert not list(tiny_base_dir.rglob("*.bin")), "weights are saved as safetensors only"


def hub_cache(tmp_path, monkeypatch, repos: dict) -> None:
    """A Hugging Face cache under `tmp_path` holding `repos` (id: folder) as downloaded snapshots; hub unreachable."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for repo, folder in repos.items():
        entry = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        shutil.copytree(folder, entry / "snapshots" / "0123abcd")
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0123abcd")


def test_a_hub_base_loads_from_the_hugging_face_cache_and_a_missing_one_says_what_to_do(tiny_base_dir, tmp_path, monkeypatch):
    hub_cache(tmp_path, monkeypatch, {"tiny-org/tiny-sd": tiny_base_dir})
    from_hub = models.load_base("tiny-org/tiny-sd")
    assert models.weights_fingerprint(from_hub.unet) == models.weights_fingerprint(models.load_base(str(tiny_base_dir)).unet)
    cfg = config.resolve("tiny", base_model="tiny-org/tiny-sd")
    assert pretrain.build_base(cfg) == tmp_path / "hub" / "models--tiny-org--tiny-sd" / "snapshots" / "0123abcd"
    with pytest.raises(models.WeightsError, match="base_model='stable-diffusion-v1-5/stable-diffusion-v1-5' is a hub id "
                                                  "that is neither in the Hugging Face cache nor reachable .*-p base_model="):
        pretrain.build_base(config.resolve("tiny", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5"))


def test_a_hub_base_without_safetensors_is_refused(tiny_base_dir, tmp_path, monkeypatch):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_base_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    hub_cache(tmp_path, monkeypatch, {"tiny-org/pickled": pickled})
    with pytest.raises(models.WeightsError, match="'tiny-org/pickled' has no unet/diffusion_pytorch_model.safetensors"):
        models.load_base("tiny-org/pickled")


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
    pretrain.build_components("demo", 64, seed=0).unet.save_pretrained(folder / "unet", safe_serialization=True)
    with pytest.raises(models.WeightsError, match=r"mixed: components from different architectures.*text encoder is 32 wide"):
        models.load_base(str(folder))


def test_a_lora_adapter_for_another_base_is_named(tiny_base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from roentgen_lib import train

    other = pretrain.build_components("demo", 64, seed=0)
    train.add_lora(other.unet, 4, 4, "to_q,to_k,to_v,to_out.0")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(other.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers, safe_serialization=True)
    with pytest.raises(models.WeightsError, match=r"LoRA adapter .*lora does not fit the base .*size mismatch"):
        models.load_pipeline(str(tiny_base_dir), tmp_path / "lora")


def test_models_sample_in_the_profiles_precision_on_a_gpu_and_in_float32_on_the_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert models.inference_dtype("bf16", cuda) == torch.bfloat16 and models.inference_dtype("fp16", cuda) == torch.float16
    assert models.inference_dtype("no", cuda) == models.inference_dtype("bf16", cpu) == torch.float32
    assert models.compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_vae_batches_shrink_with_image_size_so_activations_keep_their_size():
    assert [models.vae_batch_size(side) for side in (32, 64, 128, 256, 512, 1024)] == [16, 16, 4, 1, 1, 1]
