"""Profiles resolve, and every bad parameter is refused with a message naming it."""

import pytest

from roentgen_lib import config


def test_profiles_resolve_with_their_sizes():
    assert config.resolve("tiny").image_size == 32
    assert config.resolve("demo").n_images == 6000 and config.resolve("demo").composed_reports == 8000
    assert config.resolve("paper", mimic_root="/").data_source == "mimic"
    assert config.resolve("paper_smoke").base_architecture == "sd-1.5" and config.resolve("paper_smoke").image_size == 512


def test_none_keeps_profile_value_and_overrides_apply():
    cfg = config.resolve("tiny", n_images=None, seed=3)
    assert cfg.n_images == 48 and cfg.seed == 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n_image": 3}, "unknown parameter 'n_image' (did you mean 'n_images'?)"),
        ({"n_images": "100"}, "parameter 'n_images' must be int or None, got '100'"),
        ({"seed": True}, "parameter 'seed' must be int"),
        ({"image_size": 30}, "'image_size' must be a multiple of 8"),
        ({"n_images": 0}, "'n_images' must be >= 1"),
        ({"data_source": "nih"}, "one of 'phantom', 'mimic'"),
        ({"val_fraction": 0.7}, "'val_fraction' must be in [0, 0.5)"),
        ({"lora_rank": 4}, "parameter 'lora_rank' applies to LoRA only, but method='full'"),
        ({"mimic_root": "/"}, "parameter 'mimic_root' is set but data_source='phantom'"),
        ({"data_source": "mimic", "mimic_root": "/no/such/mimic"}, "parameter 'mimic_root': folder '/no/such/mimic' does not exist"),
        ({"text_encoder": "models/no-encoder", "run_name": "bert"}, "parameter 'text_encoder': folder 'models/no-encoder' does not exist"),
        ({"base_model": "./no-base"}, "parameter 'base_model': folder './no-base' does not exist"),
        ({"synthetic_split_prompts": 0}, "'synthetic_split_prompts' must be >= 1 or None"),
        ({"data_workers": -1}, "'data_workers' must be >= 0"),
        ({"base_vae_crop": 40}, "'base_vae_crop' must be None or a multiple of 8 between 8 and image_size (32)"),
        ({"base_vae_crop": 12}, "'base_vae_crop' must be None or a multiple of 8 between 8 and image_size (32)"),
        ({"base_vae_crop": 0}, "'base_vae_crop' must be None or a multiple of 8"),
        ({"base_vae_batch_size": 0}, "'base_vae_batch_size' must be >= 1"),
        ({"timestep_bias": 0.0}, "'timestep_bias' must be > 0"),
        ({"timestep_bias_start": -1}, "'timestep_bias_start' must be >= 0"),
        ({"judge_blur": -0.5}, "'judge_blur' must be >= 0"),
        ({"method": "lora", "lora_max_steps": 0}, "'lora_max_steps' must be >= 1 or None"),
        ({"worker_processes": 0}, "'worker_processes' must be >= 1"),
        ({"lora_max_steps": 5}, "parameter 'lora_max_steps' applies to LoRA only, but method='full'"),
        ({"repeat_findings": "Pneumothorax"}, "'repeat_findings' must be a comma list of Finding=times"),
        ({"repeat_findings": "Pneumothorax=0"}, "with times >= 1, e.g. 'Pneumothorax=2', got 'Pneumothorax=0'"),
        ({"repeat_findings": "Edema=two"}, "'repeat_findings' must be a comma list of Finding=times"),
    ],
)
def test_bad_parameters_are_named(kwargs, fragment):
    with pytest.raises(config.ConfigError) as error:
        config.resolve("tiny", **kwargs)
    assert fragment in str(error.value)


def test_lora_takes_its_own_step_count_unless_max_steps_is_set():
    assert config.resolve("demo").max_steps == 1600
    assert config.resolve("demo", method="lora").max_steps == 400
    assert config.resolve("demo", method="lora", max_steps=100).max_steps == 100
    assert config.resolve("tiny", method="lora").max_steps == config.resolve("tiny").max_steps  # no LoRA count: max_steps


def test_unknown_profile_lists_allowed():
    with pytest.raises(config.ConfigError, match="allowed: tiny, demo, paper"):
        config.resolve("huge")


def test_paths_are_taken_from_project_root():
    cfg = config.resolve("tiny")
    assert cfg.dataset_path == config.PROJECT_ROOT / "data" / "tiny" / "cxr_dataset"
    assert config.resolve("demo").figures_path == config.PROJECT_ROOT / "figures"
    assert config.resolve("tiny").figures_path != config.PROJECT_ROOT / "figures"


def test_base_dir_moves_the_projects_base_and_conflicts_with_a_given_base(tmp_path):
    assert config.resolve("tiny").base_model_path == str(config.PROJECT_ROOT / "data" / "tiny" / "base_model")
    assert config.resolve("tiny", base_dir=str(tmp_path / "b")).base_model_path == str(tmp_path / "b")
    with pytest.raises(config.ConfigError, match="'base_dir' names where the project's own base is built"):
        config.resolve("tiny", base_dir=str(tmp_path / "b"), base_model=str(tmp_path))


def test_a_domain_text_encoder_needs_full_fine_tuning_and_a_run_name(tmp_path):
    assert config.resolve("tiny", text_encoder=str(tmp_path), run_name="bert").text_encoder == str(tmp_path)
    with pytest.raises(config.ConfigError, match="'text_encoder' .* needs method='full'"):
        config.resolve("tiny", text_encoder=str(tmp_path), method="lora", run_name="bert")
    with pytest.raises(config.ConfigError, match="'text_encoder' .* needs a run_name: .* names of the CLIP runs"):
        config.resolve("tiny", text_encoder=str(tmp_path))


def test_a_text_encoder_learning_rate_needs_a_trained_text_encoder():
    assert config.resolve("tiny", train_text_encoder=True, text_encoder_learning_rate=1e-5).text_encoder_learning_rate == 1e-5
    with pytest.raises(config.ConfigError, match="'text_encoder_learning_rate' applies to a trained text encoder"):
        config.resolve("tiny", text_encoder_learning_rate=1e-5)
    with pytest.raises(config.ConfigError, match="'text_encoder_learning_rate' must be > 0 or None, got 0"):
        config.resolve("tiny", train_text_encoder=True, text_encoder_learning_rate=0.0)


def test_a_hub_id_is_not_taken_for_a_missing_folder():
    assert config.resolve("tiny", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5").base_model_path == \
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config.resolve("tiny", method="lora", lora_rank=4).lora_rank == 4


def test_repeat_findings_parse_to_counts():
    assert config.resolve("tiny", repeat_findings=" Pneumothorax=2, Edema=3 ").finding_repeats_per_epoch == {
        "Pneumothorax": 2, "Edema": 3}
    assert config.resolve("tiny").finding_repeats_per_epoch == {}
