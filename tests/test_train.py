"""The training loop: data order, checkpoints, resumption, outputs, and two processes."""

import dataclasses
import inspect
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file

from roentgen_lib import checkpoints, config, models, parallel, pretrain, sample, train
from roentgen_lib.data import dataset
from roentgen_lib.train import latents, loop, loss


def test_batch_indices_cover_an_epoch_and_split_across_processes():
    n, batch, world = 40, 4, 2
    rows = np.arange(n)
    seen = np.concatenate([train.batch_indices(rows, batch, step, world, rank, seed=0)
                           for step in range(n // (batch * world)) for rank in range(world)])
    assert sorted(seen) == list(range(n))
    assert np.array_equal(train.batch_indices(rows, batch, 7, world, 1, 0), train.batch_indices(rows, batch, 7, world, 1, 0))
    assert not np.array_equal(train.batch_indices(rows, batch, 0, 1, 0, 0), train.batch_indices(rows, batch, 5, 1, 0, 0))


def test_repeated_findings_are_shown_that_many_times_per_epoch():
    labels = {"Pneumothorax": [1.0, None, 0.0, 1.0], "Edema": [1.0, 1.0, None, None], "Cardiomegaly": [0.0] * 4}
    rows = train.epoch_rows(4, labels, {"Pneumothorax": 3, "Edema": 2})
    assert np.bincount(rows).tolist() == [4, 2, 1, 3]  # pair 0 has both findings: 1 + 2 + 1
    assert train.epoch_rows(4, {}, {}).tolist() == [0, 1, 2, 3]
    per_epoch = len(rows) // 2
    epoch = np.concatenate([train.batch_indices(rows, 2, step, 1, 0, seed=0) for step in range(per_epoch)])
    assert np.bincount(epoch).tolist() == [4, 2, 1, 3]
    with pytest.raises(ValueError, match="'Pneumothrax', which the dataset does not label; its findings: Pneumothorax"):
        train.epoch_rows(4, labels, {"Pneumothrax": 2})


def test_training_rows_repeat_the_pairs_of_the_named_finding(tiny_world):
    part = dataset.load(tiny_world)["train"]
    assert train.training_rows(tiny_world, part).tolist() == list(range(len(part)))
    rows = train.training_rows(dataclasses.replace(tiny_world, repeat_findings="Lung Opacity=2"), part)
    positive = np.asarray(part["Lung Opacity"], dtype=float) == 1
    assert positive.any() and np.array_equal(np.bincount(rows, minlength=len(positive)), 1 + positive)


def test_checkpoint_state_round_trip(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    checkpoints.write_checkpoint(tmp_path, 5, {"optimizer": state}, keep=2)
    checkpoints.write_checkpoint(tmp_path, 10, {"optimizer": state}, keep=2)
    checkpoints.write_checkpoint(tmp_path, 15, {"optimizer": state}, keep=2)
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path)] == [10, 15]
    (tmp_path / ".checkpoint-20.tmp-x").mkdir()  # a crash mid-write leaves only a hidden temporary
    step, states = checkpoints.read_checkpoint(checkpoints.latest_checkpoint(tmp_path))
    assert step == 15 and states["optimizer"]["param_groups"] == state["param_groups"]
    assert torch.equal(states["optimizer"]["state"][0]["exp_avg"], torch.ones(2))
    assert {p.suffix for p in tmp_path.rglob("*.*") if p.is_file()} <= {".json", ".safetensors"}


def run(cfg, **overrides):
    return train.finetune(dataclasses.replace(cfg, **overrides))


def weights(folder):
    return {f.relative_to(folder): load_file(f) for f in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resumed_run_ends_with_the_same_weights(tiny_world, method, monkeypatch):
    straight = run(tiny_world, method=method, train_text_encoder=True, run_name=f"straight_{method}", resume=False)
    real = loop.write_checkpoint

    def crash_after_first_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(loop, "write_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_world, method=method, train_text_encoder=True, run_name=f"resumed_{method}")
    monkeypatch.setattr(loop, "write_checkpoint", real)
    assert [s for s, _ in checkpoints.list_checkpoints(tiny_world.run_path.parent / f"resumed_{method}")] == [6]
    resumed = run(tiny_world, method=method, train_text_encoder=True, run_name=f"resumed_{method}")
    a, b = weights(straight.output_dir), weights(resumed.output_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
    log = (resumed.run_dir / "log.csv").read_text().splitlines()
    assert len([r for r in log if r.startswith("6,train,loss")]) == 1, "no duplicate log rows after resuming"


def test_resuming_with_other_settings_is_refused(tiny_world):
    run(tiny_world, run_name="settings", resume=False)
    with pytest.raises(ValueError, match="different learning_rate"):
        run(tiny_world, run_name="settings", learning_rate=0.5)


def test_a_run_for_other_max_steps_is_set_aside_not_resumed(tiny_world):
    done = run(tiny_world, run_name="steps", resume=False)
    before = weights(done.output_dir)
    with pytest.warns(UserWarning, match=f"was trained for max_steps={tiny_world.max_steps}, not 6 .*moved it to steps.stale-1"):
        shorter = run(tiny_world, run_name="steps", max_steps=6)
    assert train.logged_step(shorter.run_dir) == 6 and shorter.seconds_per_step > 0  # trained afresh, to 6
    assert train.logged_step(shorter.run_dir, since=(shorter.run_dir / "log.csv").stat().st_mtime + 1) == 0
    kept = weights(done.run_dir.with_name("steps.stale-1") / "pipeline")
    assert all(torch.equal(before[f][k], kept[f][k]) for f in before for k in before[f])


def test_a_run_started_afresh_sets_the_old_checkpoints_aside(tiny_world):
    run(tiny_world, run_name="afresh", resume=False)
    with pytest.warns(UserWarning, match="has checkpoints and resume=False; moved it to afresh.stale-1"):
        again = run(tiny_world, run_name="afresh", resume=False, max_steps=6)
    # the old checkpoint-12 would otherwise outrank this run's and be what a later resume continues from
    assert [s for s, _ in checkpoints.list_checkpoints(again.run_dir)] == [6]
    assert [s for s, _ in checkpoints.list_checkpoints(again.run_dir.with_name("afresh.stale-1"))] == [6, 12]


def test_variant_runs_are_named_after_the_variant_and_prefixed_by_run_name(tiny_world):
    plain = train.variant_configs(dataclasses.replace(tiny_world, full_variants="unet,both"))
    assert {name: c.run_path.name for name, c in plain.items()} == {"unet": "full_unet", "both": "full_unet_te"}
    swept = train.variant_configs(dataclasses.replace(tiny_world, full_variants="text_encoder", run_name="seed1"))
    assert swept["text_encoder"].run_path.name == "seed1_full_te"
    assert (swept["text_encoder"].train_unet, swept["text_encoder"].train_text_encoder) == (False, True)


def test_text_encoder_alone_takes_its_own_step_count_unless_max_steps_is_set():
    def steps(**overrides):
        return {name: c.max_steps for name, c in train.variant_configs(config.resolve("demo", **overrides)).items()}
    assert steps() == {"unet": 1600, "text_encoder": 400, "both": 1600}
    assert steps(max_steps=100) == {"unet": 100, "text_encoder": 100, "both": 100}
    assert steps(max_steps=100, text_encoder_max_steps=50) == {"unet": 100, "text_encoder": 50, "both": 100}
    with pytest.raises(config.ConfigError, match="'text_encoder_max_steps' applies to full fine-tuning only"):
        config.resolve("demo", method="lora", text_encoder_max_steps=10)


def test_text_encoder_only_leaves_the_unet_untouched(tiny_world):
    result = run(tiny_world, train_unet=False, train_text_encoder=True, run_name="te_only", resume=False)
    tuned = models.load_base(str(result.output_dir))
    base = models.load_base(tiny_world.base_model_path)
    assert all(torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), base.unet.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(tuned.text_encoder.parameters(), base.text_encoder.parameters()))
    log = (result.run_dir / "log.csv").read_text()
    assert "validation,loss" in log and (result.run_dir / "validation" / "step-000012.png").is_file()


def test_unet_run_with_a_domain_text_encoder_keeps_the_encoder_and_samples(tiny_world, text_model_dir):
    """03's `text_encoder` parameter: the U-Net learns from the cached states of a frozen BERT-style encoder."""
    result = run(tiny_world, text_encoder=str(text_model_dir), run_name="domain_text", resume=False)
    tuned = models.load_base(str(result.output_dir))
    given = models.load_base(tiny_world.base_model_path, text_encoder=str(text_model_dir), seed=tiny_world.seed)
    assert isinstance(tuned.text_encoder, models.ProjectedTextEncoder) and tuned.tokenizer.model_max_length == 77
    assert all(torch.equal(p, q) for p, q in zip(tuned.text_encoder.parameters(), given.text_encoder.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(tuned.unet.parameters(), given.unet.parameters()))
    grid = models.sample_grid(models.load_pipeline(tiny_world.base_model_path, result.output_dir),
                              ["no large left pleural effusion"], 0, steps=2)
    assert np.isfinite(grid).all() and grid.std() > 0


def test_text_encoder_learning_rate_applies_to_the_encoders_own_weights(tiny_world, text_model_dir):
    """kohya's text_encoder_lr: a near-zero rate keeps the encoder; the U-Net and a new projection still learn."""
    result = run(tiny_world, train_text_encoder=True, text_encoder_learning_rate=1e-12, text_encoder=str(text_model_dir),
                 run_name="slow_text", resume=False)
    tuned = models.load_base(str(result.output_dir))
    given = models.load_base(tiny_world.base_model_path, text_encoder=str(text_model_dir), seed=tiny_world.seed)
    for module, moved in ((lambda b: b.text_encoder.encoder, False), (lambda b: b.text_encoder.projection, True),
                          (lambda b: b.unet, True)):
        close = all(torch.allclose(p, q, atol=1e-9) for p, q in zip(module(tuned).parameters(), module(given).parameters()))
        assert close != moved
    cfg = dataclasses.replace(tiny_world, train_text_encoder=True, text_encoder_learning_rate=1e-4)
    trained = loop.trained_models(models.load_base(tiny_world.base_model_path), cfg)
    groups = loop.optimizer_groups(loop.trained_parameters(trained), trained["text_encoder"], cfg)
    assert [g.get("lr") for g in groups] == [None, 1e-4] and all(g["params"] for g in groups)


def test_gradient_checkpointing_trains_the_same_weights(tiny_world):
    """Recomputing activations in the backward pass (paper profile) changes memory, not the result."""
    plain, checkpointed = (run(tiny_world, train_text_encoder=True, max_steps=3, run_name=f"checkpointing_{on}",
                               resume=False, gradient_checkpointing=on) for on in (False, True))
    expected, found = weights(plain.output_dir), weights(checkpointed.output_dir)
    assert expected.keys() == found.keys()
    for name, tensors in expected.items():
        for key, tensor in tensors.items():
            assert torch.allclose(tensor, found[name][key], atol=1e-6), (name, key)


def test_lora_output_loads_and_scale_zero_is_the_base(tiny_world):
    # on the base's own schedule (zero_terminal_snr gives the adapters a schedule of their own)
    result = run(tiny_world, method="lora", run_name="lora_scale", resume=False, zero_terminal_snr=False)
    prompts = ["large left pleural effusion"]
    base = models.sample_grid(models.load_pipeline(tiny_world.base_model_path), prompts, 0, steps=3)
    tuned = models.sample_grid(models.load_pipeline(tiny_world.base_model_path, result.output_dir), prompts, 0, steps=3)
    off = models.sample_grid(models.load_pipeline(tiny_world.base_model_path, result.output_dir, 0.0), prompts, 0, steps=3)
    assert not np.array_equal(base, tuned) and np.array_equal(base, off)


def test_lora_on_convolutions_and_attention_loads_every_trained_adapter(tiny_world):
    """Adapters beyond attention (the transformer projections kohya adapts, convolutions) survive saving and loading."""
    targets = {"unet_lora_targets": "to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1", "text_lora_targets": "q_proj,v_proj,fc1"}
    cfg = dataclasses.replace(tiny_world, method="lora", train_text_encoder=True, run_name="lora_conv", resume=False, **targets)
    output = train.finetune(cfg).output_dir
    loaded = models.load_pipeline(cfg.base_model_path, output)
    expected = models.load_base(cfg.base_model_path)
    loop.trained_models(expected, cfg)  # the adapters training attached, freshly initialised

    def adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name.split(".lora_B")[0]: p for name, p in model.named_parameters() if ".lora_B" in name}

    for ours, reference in ((loaded.unet, expected.unet), (loaded.text_encoder, expected.text_encoder)):
        assert adapters(ours).keys() == adapters(reference).keys()
        assert all(p.abs().sum() > 0 for p in adapters(ours).values())  # trained, not freshly initialised
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), "pt") as saved:
        metadata = json.loads(saved.metadata()["lora_adapter_metadata"])
    for model in ("unet", "text_encoder"):  # listed in a fixed order, so the file's bytes do not vary from run to run
        assert metadata[f"{model}.target_modules"] == sorted(metadata[f"{model}.target_modules"])


def test_a_run_from_another_base_is_set_aside_not_resumed(tiny_world, tmp_path):
    first = run(tiny_world, run_name="rebased", resume=False)
    other = models.load_base(tiny_world.base_model_path)
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)  # as if the base had been rebuilt by changed code
    models.save_base(other, tmp_path / "other_base")
    with pytest.warns(UserWarning, match="different base model or dataset"):
        again = run(tiny_world, run_name="rebased", base_model=str(tmp_path / "other_base"))
    assert (first.run_dir.parent / "rebased.stale-1" / "checkpoint-12").is_dir()
    assert "rebased.stale-1" not in sample.available_models(tiny_world)  # set aside, not a model to sample or score
    fresh = run(tiny_world, run_name="rebased_fresh", base_model=str(tmp_path / "other_base"), resume=False)
    ours, reference = weights(again.output_dir), weights(fresh.output_dir)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[f][k], reference[f][k]) for f in ours for k in ours[f])
    assert again.seconds_per_step > 0
    resumed_finished = run(tiny_world, run_name="rebased", base_model=str(tmp_path / "other_base"))
    assert resumed_finished.seconds_per_step == pytest.approx(again.seconds_per_step)  # recorded, not NaN


def test_full_output_is_a_diffusers_pipeline(tiny_world):
    from diffusers import StableDiffusionPipeline

    result = run(tiny_world, run_name="full_unet_pipe", resume=False)
    pipe = StableDiffusionPipeline.from_pretrained(result.output_dir, use_safetensors=True, safety_checker=None)
    assert pipe.unet.config.sample_size == 8
    assert result.images_per_second > 0 and result.peak_memory_mb > 0


def test_base_recipe_tracks_settings_and_version(monkeypatch):
    cfg = config.resolve("tiny")
    recipe = pretrain.recipe(cfg)
    assert recipe == pretrain.recipe(config.resolve("tiny")) != pretrain.recipe(config.resolve("tiny", base_steps=21))
    monkeypatch.setattr(pretrain, "RECIPE_VERSION", pretrain.RECIPE_VERSION + 1)
    assert pretrain.recipe(cfg) != recipe


@pytest.mark.skipif(not loop.PEAK_RESET.exists(), reason="resetting the peak resident set size needs Linux's clear_refs")
def test_a_runs_peak_memory_is_its_own_not_its_processes(tiny_world, tmp_path):
    ballast = np.ones(2**31, np.uint8)  # 2 GiB touched, then freed, before the run: a kernel that drew images
    held = loop.peak_memory_mb(torch.device("cpu"))
    del ballast
    result = train.finetune(dataclasses.replace(tiny_world, models_dir=str(tmp_path), run_name="peak", max_steps=2,
                                                resume=False))
    assert 0 < result.peak_memory_mb < held - 1024


def test_fused_adamw_only_where_torch_has_the_kernel():
    assert train.fused_adamw_available([torch.nn.Parameter(torch.zeros(2))])
    assert not train.fused_adamw_available([torch.nn.Parameter(torch.zeros(2, device="meta"))])


def test_two_processes_train_and_checkpoint(tiny_world, tmp_path, capfd, monkeypatch):
    # `accelerate launch` over two gloo processes on the CPU, as a notebook asks with num_processes=2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = dataclasses.replace(tiny_world, models_dir=str(tmp_path), run_name="ddp", progress=False, num_processes=2)
    result = train.launch(cfg)
    out = capfd.readouterr().out
    assert out.count("saved ") == 1, out  # the main process reports the saved pipeline, once
    assert f"saved {tmp_path / 'ddp' / 'pipeline'} " in out and result.output_dir == tmp_path / "ddp" / "pipeline"
    assert result.steps == tiny_world.max_steps and result.seconds_per_step > 0
    record = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert record["processes"] == 2
    assert [s for s, _ in checkpoints.list_checkpoints(tmp_path / "ddp")] == [6, 12]
    assert (tmp_path / "ddp" / "pipeline" / "model_index.json").is_file()
    assert pretrain.base_exists(config.resolve("tiny", base_model=tiny_world.base_model))


def test_a_base_built_into_base_dir_leaves_the_profiles_base_alone_and_outlives_a_comment_edit(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path / "project")  # where the profile's own base would go
    cfg = config.resolve("tiny", base_dir=str(tmp_path / "base"), base_images=8, base_vae_steps=1, base_steps=1,
                         progress=False)
    assert pretrain.build_base(cfg) == tmp_path / "base"
    assert pretrain.base_exists(cfg) and (tmp_path / "base" / "base.json").is_file()
    assert not (tmp_path / "project" / "data" / "tiny" / "base_model").exists()
    # caches are keyed on recipe versions and settings, never on source code: a refactor keeps them
    rows, _ = dataset.plan_phantom(cfg)
    planned = dataset.plan_fingerprint(cfg, rows, dataset.SHARD_ROWS)
    monkeypatch.setattr(inspect, "getsource", lambda obj: "# every module's source, edited\n")
    assert pretrain.base_exists(cfg) and dataset.plan_fingerprint(cfg, rows, dataset.SHARD_ROWS) == planned


def test_uniform_timesteps_are_drawn_as_before_and_a_bias_favours_high_noise(tiny_world):
    uniform_cfg = dataclasses.replace(tiny_world, timestep_bias=1.0)
    uniform = loss.draw_timesteps(64, 1000, uniform_cfg, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    biased_cfg = dataclasses.replace(tiny_world, timestep_bias=8.0, timestep_bias_start=800)
    biased = loss.draw_timesteps(20000, 1000, biased_cfg, torch.Generator().manual_seed(3))
    assert 0 <= biased.min() and biased.max() < 1000
    assert abs((biased >= 800).float().mean().item() - 8 * 0.2 / (0.8 + 8 * 0.2)) < 0.02  # 2/3 instead of 1/5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero_terminal_snr_run_saves_the_schedule_its_sampler_starts_from(tiny_world, method):
    result = run(tiny_world, zero_terminal_snr=True, method=method, run_name=f"zero_snr_{method}", max_steps=2,
                 resume=False)
    scheduler = models.load_pipeline(tiny_world.base_model_path, result.output_dir).scheduler
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert not models.load_pipeline(tiny_world.base_model_path).scheduler.config.rescale_betas_zero_snr


def test_zero_terminal_snr_schedule_ends_at_pure_noise_and_needs_v_prediction(tiny_world):
    base_schedule = models.load_base(tiny_world.base_model_path).noise_scheduler
    assert loss.zero_terminal_snr_schedule(base_schedule).alphas_cumprod[-1] < 1e-6
    epsilon = DDPMScheduler.from_config(base_schedule.config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="needs a v-prediction base"):
        loss.zero_terminal_snr_schedule(epsilon)


def test_runs_trained_side_by_side_match_a_run_trained_alone(tiny_world):
    configs = {"unet": dataclasses.replace(tiny_world, run_name="side_unet", resume=False),
               "both": dataclasses.replace(tiny_world, run_name="side_both", train_text_encoder=True, resume=False)}
    results = train.train_runs(configs, processes=2)
    assert list(results) == ["unet", "both"]
    assert train.logged_step(results["both"].run_dir) == tiny_world.max_steps
    threads = torch.get_num_threads()
    try:  # the same run in this process, with the share of threads each of the two processes had
        alone, _ = parallel.call_with_threads(train.finetune, max(1, threads // 2), 0,
                                              (dataclasses.replace(configs["both"], run_name="alone_both"),))
    finally:
        torch.set_num_threads(threads)
    a, b = weights(results["both"].output_dir), weights(alone.output_dir)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])


def test_a_failing_run_is_raised_with_its_error(tiny_world, tmp_path):
    broken = dataclasses.replace(tiny_world, run_name="broken", output_dir=str(tmp_path / "no_dataset"))
    with pytest.raises(FileNotFoundError, match="no_dataset: run 01_data_prep first"):
        train.train_runs({"broken": broken}, processes=1)


def test_warnings_of_a_run_in_its_own_process_reach_the_caller(tiny_world, tmp_path):
    run(tiny_world, run_name="rebased_apart", resume=False)
    other = models.load_base(tiny_world.base_model_path)
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.01)
    models.save_base(other, tmp_path / "other_base")
    moved = dataclasses.replace(tiny_world, run_name="rebased_apart", base_model=str(tmp_path / "other_base"))
    with pytest.warns(UserWarning, match="unet: .*rebased_apart was trained from a different base model or dataset"):
        train.train_runs({"unet": moved}, processes=1)


def base_validation_loss(cfg, folder) -> float:
    """The held-out loss a fine-tune starts from: the base's, on the same fixed noise and timesteps."""
    base = models.load_base(cfg.base_model_path)
    if cfg.zero_terminal_snr:
        base.noise_scheduler = loss.zero_terminal_snr_schedule(base.noise_scheduler)
    data, key = dataset.load(cfg)["validation"], dataset.read_manifest(cfg.dataset_path)["fingerprint"]
    pairs = latents.encode_pairs(base, latents.dataset_source(data, key), cfg.image_size, True, folder, progress=False)
    return loss.validation_loss(base, pairs, cfg, torch.device("cpu"))


def test_fine_tuning_lowers_the_held_out_loss(tiny_world, tmp_path, record_property):
    """The number 02 and 03 report: the held-out loss falls from the base's. The drops agree to 2e-5 on
    every kernel path measured (native AVX-512, AVX2, generic; one and two threads) and are 0 when no
    step updates the weights (docs/testing.md)."""
    before = base_validation_loss(tiny_world, tmp_path)
    drops = {}
    for method in ("full", "lora"):
        result = run(tiny_world, method=method, train_text_encoder=True, run_name=f"lowers_{method}", resume=False,
                     max_steps=24)
        log = pd.read_csv(result.log)
        drops[method] = before - log[log.split == "validation"].value.iloc[-1]
        record_property(f"{method} drop", float(drops[method]))  # `pytest --junitxml` keeps it (docs/testing.md)
    assert drops == pytest.approx({"full": 1.0414, "lora": 0.0965}, abs=0.005)


def stable_diffusion_shaped_base(folder, prediction: str, text_width: int) -> str:
    """The tiny base re-cut to Stable Diffusion 1.x / 2.x's shape: its prediction target and text-encoder width,
    and (2.x) attention through linear projections that upcasts; a few channels wide."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = pretrain.build_components("tiny", 32, seed=0)
    sd2 = {"use_linear_projection": True, "upcast_attention": True} if prediction == "v_prediction" else {}
    base.unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=text_width,
        attention_head_dim=(2, 4), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **sd2)
    base.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    base.noise_scheduler = DDPMScheduler(**{**pretrain.SD_SCHEDULER, "prediction_type": prediction})
    models.save_base(base, folder)
    return str(folder)


@pytest.mark.parametrize("prediction, text_width", [("epsilon", 768), ("v_prediction", 1024)], ids=["sd1", "sd2"])
def test_stable_diffusion_1_and_2_shaped_bases_fine_tune_resume_and_sample(tiny_world, tmp_path, prediction, text_width):
    cfg = dataclasses.replace(tiny_world, base_model=stable_diffusion_shaped_base(tmp_path / "base", prediction, text_width),
                              models_dir=str(tmp_path / "models"), train_text_encoder=True, max_steps=4,
                              checkpoint_every=2, validation_every=4, zero_terminal_snr=prediction == "v_prediction")
    assert pretrain.build_base(cfg) == tmp_path / "base"
    result = train.finetune(cfg)
    assert [s for s, _ in checkpoints.list_checkpoints(result.run_dir)] == [2, 4]
    model = sample.load_model(cfg, result.run_dir.name)
    assert model.pipe.text_encoder.config.hidden_size == text_width
    assert model.pipe.scheduler.config.prediction_type == prediction
    image = sample.generate(model, ["large left pleural effusion"], [0], sample.SamplingSettings(steps=2, batch_size=1))
    assert image.shape == (1, 32, 32, 3) and image.std() > 0
