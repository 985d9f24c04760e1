"""Sampling: determinism by seed, LoRA scale 0 = base, edits, inpainting, resumable synthetic datasets, bad input."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import torch

from roentgen_lib import config, evaluate, experiments, parallel, sample, smoke, train
from roentgen_lib.data import edit_cases
from roentgen_lib.sample import synthetic
from roentgen_lib.text.labels import label_report

SETTINGS = sample.SamplingSettings(steps=3, batch_size=4)


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    """A LoRA and a full fine-tune of the tiny base (12 steps each), alone in their models folder."""
    cfg = dataclasses.replace(tiny_world, models_dir=str(tmp_path_factory.mktemp("sample_models")))
    for method in ("lora", "full"):
        train.finetune(dataclasses.replace(cfg, method=method, resume=False))
    return cfg


def test_available_models_lists_the_base_and_finished_runs(runs):
    assert list(sample.available_models(runs)) == ["base", "full_unet", "lora_unet"]


def test_a_seed_names_an_image(runs):
    model = sample.load_model(runs, "full_unet")
    prompts = ["large left pleural effusion", "large right pneumothorax", "moderate cardiomegaly"]
    first = sample.generate(model, prompts, [1, 2, 3], SETTINGS)
    assert first.shape == (3, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, sample.generate(model, prompts, [1, 2, 3], SETTINGS))
    assert not np.array_equal(first[0], sample.generate(model, prompts[:1], [9], SETTINGS)[0])
    alone = sample.generate(model, prompts[1:2], [2], SETTINGS.replace(batch_size=1))[0]
    assert np.abs(alone.astype(int) - first[1]).mean() < 1.0  # batch composition changes only float rounding


def test_lora_scale_zero_is_the_base(runs):
    prompts, seeds = ["large left pleural effusion", "no acute cardiopulmonary process"], [0, 1]
    off_model = sample.load_model(runs, "lora_unet", lora_scale=0.0)
    base_model = sample.load_model(runs, "base")
    assert runs.zero_terminal_snr and off_model.pipe.scheduler.config.rescale_betas_zero_snr
    base_model.pipe.scheduler = off_model.pipe.scheduler  # the adapters carry the schedule they were trained on
    base = sample.generate(base_model, prompts, seeds, SETTINGS)
    off = sample.generate(off_model, prompts, seeds, SETTINGS)
    on = sample.load_model(runs, "lora_unet")
    assert np.array_equal(base, off) and not np.array_equal(base, sample.generate(on, prompts, seeds, SETTINGS))
    assert on.fingerprint != sample.load_model(runs, "lora_unet", lora_scale=0.5).fingerprint


@pytest.mark.parametrize("scheduler", list(sample.SCHEDULERS))
def test_every_scheduler_samples(runs, scheduler):
    model = sample.load_model(runs, "base")
    images = sample.generate(model, ["small left pneumothorax"], [0], SETTINGS.replace(scheduler=scheduler))
    assert images.shape == (1, 32, 32, 3) and images.std() > 0


def test_edit_changes_more_at_higher_strength(runs):
    model = sample.load_model(runs, "full_unet")
    case = edit_cases.phantom_edit_cases(32, seed=0)[0]
    weak, strong = (sample.edit(model, [case.image], [case.edit_prompt], [0], SETTINGS, strength=s)[0]
                    for s in (0.4, 1.0))
    change = sample.edit_identity(np.stack([case.image] * 2), np.stack([weak, strong]), [case.region] * 2)
    assert change["MAE outside region"][0] < change["MAE outside region"][1]


def test_phantom_edit_regions_are_on_the_named_side():
    for case in edit_cases.phantom_edit_cases(64, seed=0):
        half = case.region[:, :32].sum() > case.region[:, 32:].sum()  # patient's right is the image's left
        assert half == ("right" in case.edit_prompt or "pneumothorax" in case.source_prompt), case.edit_prompt


def test_edit_strength_must_leave_a_step(runs):
    with pytest.raises(sample.SamplingError, match="leaves no denoising step"):
        sample.edit(sample.load_model(runs, "base"), [np.zeros((32, 32), np.uint8)], ["effusion"], [0], SETTINGS, 0.2)


def test_edit_identity_measures_inside_and_outside():
    original = np.zeros((2, 8, 8), np.uint8)
    edited = original.copy()
    edited[:, :, :4] = 40
    edited[1, :, 4:] = 10
    table = sample.edit_identity(original, edited, [np.arange(64).reshape(8, 8) % 8 < 4] * 2)
    assert table["MAE inside region"].tolist() == [40.0, 40.0] and table["MAE outside region"].tolist() == [0.0, 10.0]


def test_inpainting_keeps_the_unmasked_pixels(runs):
    model = sample.load_model(runs, "full_unet")
    image = edit_cases.phantom_edit_cases(32, seed=0)[0].image
    mask = np.zeros((32, 32), bool)
    mask[8:24, 2:14] = True
    out = sample.inpaint(model, [image], [mask], ["large right pneumothorax"], [0], SETTINGS)[0]
    rgb = np.repeat(image[..., None], 3, axis=2)
    assert np.array_equal(out[~mask], rgb[~mask]) and not np.array_equal(out[mask], rgb[mask])
    with pytest.raises(sample.SamplingError, match="got 2 images, 1 masks and 2 prompts"):
        sample.inpaint(model, [image, image], [mask], ["a", "b"], [0, 1], SETTINGS)


def test_outpainting_extends_the_border(runs):
    model = sample.load_model(runs, "full_unet")
    image = edit_cases.phantom_edit_cases(32, seed=0)[1].image
    out, canvas = sample.outpaint(model, [image], ["no acute cardiopulmonary process"], [0], SETTINGS, scale=0.5)
    assert out.shape == canvas.shape == (1, 32, 32, 3)
    assert np.array_equal(out[0, 8:24, 8:24], canvas[0, 8:24, 8:24]) and out[0, :4].std() > 0


@pytest.mark.parametrize("spec", synthetic.finding_specs())
def test_composed_prompts_read_back_as_their_spec(spec):
    labels = label_report(synthetic.compose_prompt(**spec))[spec["finding"]]
    assert labels["status"] == "positive" and labels["severity"] == spec["severity"]
    assert labels["laterality"] == spec["side"]


def test_synthetic_dataset_resumes_to_the_same_result(runs, tmp_path, monkeypatch):
    model = sample.load_model(runs, "full_unet")
    prompts = pd.concat([synthetic.split_prompts(runs, "test"), synthetic.list_prompts(["large left pleural effusion"])],
                        ignore_index=True)
    straight = synthetic.generate_dataset(model, prompts, tmp_path / "straight", SETTINGS, 2, seed=0, progress=False)

    real, calls = synthetic.generate, []

    def crash_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_dataset(model, prompts, tmp_path / "resumed", SETTINGS, 2, seed=0, progress=False)
    assert not (tmp_path / "resumed").exists() and len(list((tmp_path / ".resumed.parts").glob("batch-*"))) == 2
    calls.clear()
    resumed = synthetic.generate_dataset(model, prompts, tmp_path / "resumed", SETTINGS, 2, seed=0, progress=False)
    assert len(calls) == -(-len(straight) // SETTINGS.batch_size) - 2  # only the missing batches were drawn
    assert not (tmp_path / ".resumed.parts").exists()
    for column in ("prompt", "seed", "source", "model_fingerprint", "Pleural Effusion", "intended"):
        assert list(straight[column]) == list(resumed[column]), column
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight["image"], resumed["image"]))
    assert len(straight) == 2 * len(prompts) and straight[len(straight) - 1]["Pleural Effusion"] == 1.0
    assert json.loads(straight[len(straight) - 1]["intended"])["Pleural Effusion"]["laterality"] == "left"


def test_two_processes_draw_the_dataset_and_tables_that_one_draws(runs, tmp_path):
    cfg = dataclasses.replace(runs, evaluation_dir=str(tmp_path / "evaluation"), sampling_steps=2, sample_batch_size=4,
                              eval_prompts=4, prompt_set_size=3, progress=False)
    model = sample.load_model(cfg, "lora_unet")
    threads = torch.get_num_threads()
    try:  # one process, with the threads each of the two worker processes gets: then every batch is bitwise equal
        (one, _), (alone, _) = (parallel.call_with_threads(function, max(1, threads // 2), 0, args) for function, args in (
            (synthetic.generate_dataset, (model, synthetic.split_prompts(cfg, "test"), tmp_path / "one", SETTINGS, 2, 0, False)),
            (experiments.evaluation_images, (dataclasses.replace(cfg, evaluation_dir=str(tmp_path / "alone")), model))))
    finally:
        torch.set_num_threads(threads)
    two = synthetic.generate_dataset(model, synthetic.split_prompts(cfg, "test"), tmp_path / "two", SETTINGS, 2, 0,
                                     progress=False, processes=2)
    experiments.draw_evaluation_images(dataclasses.replace(cfg, num_processes=2), ["lora_unet"])
    split = experiments.evaluation_images(cfg, model)  # drawn above by two processes, found finished
    assert synthetic.read_manifest(tmp_path / "evaluation" / "images" / "lora_unet")["last_run"]["images_drawn"] == len(split)
    for a, b in ((one, two), (alone, split)):
        assert len(a) == len(b) > SETTINGS.batch_size and list(a["seed"]) == list(b["seed"])
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))
        pd.testing.assert_frame_equal(synthetic.describe(a), synthetic.describe(b))
        groups = list(a["source"])
        pd.testing.assert_frame_equal(evaluate.diversity_table(np.stack([np.asarray(i) for i in a["image"]]), groups),
                                      evaluate.diversity_table(np.stack([np.asarray(i) for i in b["image"]]), groups))


def test_a_finished_synthetic_dataset_is_reused(runs, tmp_path, monkeypatch):
    model = sample.load_model(runs, "base")
    prompts = synthetic.list_prompts(["moderate cardiomegaly"])
    synthetic.generate_dataset(model, prompts, tmp_path / "s", SETTINGS, 1, seed=0, progress=False)
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("redrew a finished dataset"))
    assert len(synthetic.generate_dataset(model, prompts, tmp_path / "s", SETTINGS, 1, seed=0, progress=False)) == 1


# --- bad input: a clear error or warning naming the problem ---

def test_empty_prompt_is_refused(runs):
    with pytest.raises(sample.SamplingError, match="prompt 1 is empty"):
        sample.generate(sample.load_model(runs, "base"), ["effusion", "  "], [0, 1], SETTINGS)


def test_a_single_string_is_refused(runs):
    with pytest.raises(sample.SamplingError, match="wrap it"):
        sample.generate(sample.load_model(runs, "base"), "effusion", [0], SETTINGS)


def test_long_prompt_warns_with_the_dropped_part(runs):
    prompt = "small left pleural effusion. " * 20 + "large right pneumothorax."
    with pytest.warns(UserWarning, match="1 prompt.s. longer .* ignored: prompt 0: .*right pneumothorax") as caught:
        sample.generate(sample.load_model(runs, "base"), [prompt, prompt], [0, 1], SETTINGS)
    assert len([w for w in caught if "longer than" in str(w.message)]) == 1


def test_unknown_scheduler_is_refused_with_a_suggestion(runs):
    with pytest.raises(sample.SamplingError, match="unknown scheduler 'dim' .did you mean 'ddim'"):
        sample.generate(sample.load_model(runs, "base"), ["effusion"], [0], SETTINGS.replace(scheduler="dim"))
    with pytest.raises(config.ConfigError, match="scheduler"):
        config.resolve("tiny", scheduler="dpm")


def test_missing_run_folder_is_refused_listing_what_exists(runs):
    with pytest.raises(sample.SamplingError, match="no finished run 'full_unet_te'.*available: base, full_unet, lora_unet"):
        sample.load_model(runs, "full_unet_te")


def test_missing_base_is_refused(tmp_path):
    (tmp_path / "no_base").mkdir()  # a folder, but no pipeline in it (a missing folder is refused by config)
    cfg = config.resolve("tiny", base_model=str(tmp_path / "no_base"), models_dir=str(tmp_path))
    with pytest.raises(sample.SamplingError, match="no base model at .*no_base.*make base"):
        sample.load_model(cfg, "base")


def test_mask_of_the_wrong_size_is_refused(runs):
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(sample.SamplingError, match=r"mask 0 has shape \(16, 16\) but its image is 32x32"):
        sample.inpaint(sample.load_model(runs, "base"), [image], [np.ones((16, 16), bool)], ["effusion"], [0], SETTINGS)


def test_seed_count_must_match(runs):
    with pytest.raises(sample.SamplingError, match="2 prompts but 1 seeds"):
        sample.generate(sample.load_model(runs, "base"), ["a", "b"], [0], SETTINGS)


def test_prompt_csv_needs_a_prompt_column(tmp_path):
    (tmp_path / "p.csv").write_text("text\nlarge effusion\n")
    with pytest.raises(sample.SamplingError, match="no 'prompt' column"):
        synthetic.csv_prompts(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("prompt,note\nlarge left pleural effusion,x\n")
    assert synthetic.csv_prompts(tmp_path / "q.csv").prompt.tolist() == ["large left pleural effusion"]
    (tmp_path / "r.csv").write_text("prompt,note\nlarge left pleural effusion,x\n,y\n")
    with pytest.raises(sample.SamplingError, match="'prompt' column is empty in data rows 1 "):
        synthetic.csv_prompts(tmp_path / "r.csv")


def test_bad_specs_and_sweeps_are_refused():
    with pytest.raises(ValueError, match="side 'left' is not allowed for Cardiomegaly"):
        synthetic.compose_prompt("Cardiomegaly", "left", "large")
    with pytest.raises(config.ConfigError, match="guidance_sweep"):
        config.resolve("tiny", guidance_sweep="1,x")


def test_split_prompts_are_capped_by_a_seeded_sample(tiny_world):
    cfg = dataclasses.replace(tiny_world, synthetic_prompts="train,specs", synthetic_split_prompts=5)
    table = synthetic.prompt_table(cfg)
    train_rows = table[table.source.str.startswith("train:")]
    assert len(train_rows) == 5 and train_rows.index.is_monotonic_increasing
    assert list(synthetic.prompt_table(cfg).prompt) == list(table.prompt)  # the same sample every time
    everything = synthetic.prompt_table(dataclasses.replace(cfg, synthetic_split_prompts=None))
    assert everything.source.str.startswith("train:").sum() > 5


def test_the_smoke_report_tabulates_each_run_and_renders_a_full_fine_tune_in_stock_diffusers(runs):
    table = smoke.variant_table(runs).set_index("run")
    assert list(table.index) == ["full_unet", "lora_unet"] and (table["s/step"] > 0).all()
    assert table.loc["lora_unet", "trained weights M"] < table.loc["full_unet", "trained weights M"]
    assert table.loc["full_unet", "EMA"] == str(runs.ema_decay)
    render = smoke.stock_render(runs.models_path / "full_unet" / "pipeline", runs.image_size)
    assert render["image_size"] == [runs.image_size, runs.image_size]
    assert smoke.markdown(table.reset_index()).count("\n") == len(table) + 1
