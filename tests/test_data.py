"""Lung masks, the phantom renderer, the MIMIC loader and the dataset builder."""

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
from conftest import write_mimic_tree

from roentgen_lib import config
from roentgen_lib.data import dataset, masks, mimic, mimic_standin, phantom
from roentgen_lib.text import compose
from roentgen_lib.text.labels import PATHOLOGIES, label_report


@pytest.fixture(scope="module")
def lung_masks():
    return masks.load_lung_masks(128)


def test_masks_are_two_lungs_patient_right_on_viewer_left(lung_masks):
    assert lung_masks.shape[0] > 400 and lung_masks.shape[1:] == (128, 128)
    for mask in lung_masks[:20]:
        right_x = np.nonzero(mask == masks.RIGHT_LUNG)[1].mean()
        left_x = np.nonzero(mask == masks.LEFT_LUNG)[1].mean()
        assert right_x < 64 < left_x


def render(text, lung_masks, seed=0, size=64):
    return phantom.render(label_report(text), lung_masks[3], np.random.default_rng(seed), size)


def test_render_is_deterministic_by_seed(lung_masks):
    a, drawn_a = render("Large right pleural effusion.", lung_masks)
    b, drawn_b = render("Large right pleural effusion.", lung_masks)
    c, _ = render("Large right pleural effusion.", lung_masks, seed=1)
    assert a.dtype == np.uint8 and a.shape == (64, 64)
    assert np.array_equal(a, b) and drawn_a == drawn_b
    assert not np.array_equal(a, c)


def test_effusion_is_drawn_on_the_named_side(lung_masks):
    base, _ = render("No acute process.", lung_masks)
    right, drawn = render("Large right pleural effusion.", lung_masks)
    assert drawn["Pleural Effusion"] == {"side": "right", "severity": "large"}
    diff = right.astype(float) - base.astype(float)  # exposure differs too: compare the halves
    lower = slice(32, 52)
    # the patient's right is the viewer's left: the fluid whitens the left half of the image
    assert diff[lower, :32].mean() - diff[lower, 32:].mean() > 15


def test_cardiomegaly_widens_the_heart(lung_masks):
    _, normal = render("Normal heart size.", lung_masks)
    _, large = render("Large cardiomegaly.", lung_masks)
    assert normal["_ctr"]["value"] < 0.5 < large["_ctr"]["value"]


def test_pneumothorax_removes_markings_on_its_side(lung_masks):
    base, _ = render("No acute process.", lung_masks, size=128)
    ptx, drawn = render("Large left pneumothorax.", lung_masks, size=128)
    assert drawn["Pneumothorax"]["side"] == "left"
    diff = ptx.astype(float) - base.astype(float)
    left_lung = lung_masks[3] == masks.LEFT_LUNG
    assert diff[left_lung].mean() - diff[lung_masks[3] == masks.RIGHT_LUNG].mean() < -8


def test_negative_findings_are_not_drawn(lung_masks):
    _, drawn = render("No pneumothorax or effusion.", lung_masks)
    assert set(drawn) == {"_ctr"}


def test_patient_split_is_stable_and_proportional():
    splits = [dataset.patient_split(f"CXR{i}", 0.1, 0.1) for i in range(4000)]
    assert splits == [dataset.patient_split(f"CXR{i}", 0.1, 0.1) for i in range(4000)]
    assert 0.07 < splits.count("test") / 4000 < 0.13


def test_finding_repeats_oversample_abnormal_reports_within_their_patient():
    plain, _ = dataset.plan_phantom(config.resolve("tiny", n_images=3000, finding_repeats=1))
    repeated, _ = dataset.plan_phantom(config.resolve("tiny", n_images=4000, finding_repeats=3))

    def abnormal_share(rows):
        flags = [any(v["status"] == "positive" for k, v in label_report(r["prompt"]).items() if k in PATHOLOGIES)
                 for r in rows]
        return sum(flags) / len(flags)

    assert abnormal_share(repeated) > 1.5 * abnormal_share(plain)
    assert len({r["image_id"] for r in repeated}) == len(repeated)
    split_of = {}
    for row in repeated:  # every copy of a report stays with its patient's split
        assert split_of.setdefault(row["subject_id"], row["split"]) == row["split"]


def test_composed_reports_join_the_draw_one_patient_each():
    rows, _ = dataset.plan_phantom(dataclasses.replace(config.resolve("tiny", composed_reports=300), n_images=None))
    composed = [r for r in rows if r["subject_id"].startswith("composed-")]
    assert len(composed) == 300 and len({r["subject_id"] for r in composed}) == 300
    assert {r["split"] for r in composed} == {"train", "validation", "test"}
    sides = Counter(label_report(r["prompt"]).get("Pneumothorax", {}).get("laterality") for r in composed)
    assert sides["left"] > 5 and sides["right"] > 5
    with pytest.raises(config.ConfigError, match="composed_reports"):
        config.resolve("paper", mimic_root="/x", composed_reports=10)


def test_composed_normal_reports_deny_findings_and_label_normal():
    normals = [r for r in compose.composed_reports(2000, seed=0) if compose.NORMAL_PROMPT in r]
    denied = [r for r in normals if r != compose.NORMAL_PROMPT]
    assert 0.3 < len(denied) / len(normals) < 0.7
    assert {r.removesuffix(compose.NORMAL_PROMPT).strip() for r in denied} == set(compose.NORMAL_NEGATIONS)
    for report in set(denied):
        positive = {f for f, v in label_report(report).items() if v["status"] == "positive"}
        assert positive == {"No Finding"}, report


def test_phantom_dataset_build(tiny_cfg):
    result = dataset.build_dataset(tiny_cfg)
    total = sum(len(s) for s in result.dataset.values())
    assert total == tiny_cfg.n_images
    train = result.dataset["train"]
    assert train.features["image"].__class__.__name__ == "Image"
    assert train[0]["image"].size == (32, 32)
    subjects = {name: set(split["subject_id"]) for name, split in result.dataset.items()}
    assert not (subjects["train"] & subjects["test"]) and not (subjects["train"] & subjects["validation"])
    row = train[0]
    assert row["split"] == "train" and json.loads(row["drawn"])["_ctr"]["value"] > 0.3
    manifest = dataset.read_manifest(result.path)
    assert manifest["fingerprint"] == result.fingerprint and manifest["rows"]["train"] == len(train)
    # same config, same bytes
    assert dataset.build_dataset(tiny_cfg).fingerprint == result.fingerprint


def test_failed_build_keeps_previous_dataset(tiny_cfg, monkeypatch):
    first = dataset.build_dataset(tiny_cfg)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dataset, "check_patient_disjoint", broken)
    with pytest.raises(RuntimeError):
        dataset.build_dataset(tiny_cfg)
    assert dataset.read_manifest(first.path)["fingerprint"] == first.fingerprint
    # only the finished shards wait for a rerun; no half-written folder is left behind
    assert [p.name for p in first.path.parent.iterdir() if p.name.startswith(".")] == [".dataset.parts"]
    monkeypatch.undo()
    assert dataset.build_dataset(tiny_cfg).reused_shards == 3


def test_parallel_build_equals_serial_build(tiny_cfg, tmp_path):
    serial = dataset.build_dataset(tiny_cfg, shard_rows=8)
    parallel = dataset.build_dataset(dataclasses.replace(tiny_cfg, data_workers=2, output_dir=str(tmp_path / "p")),
                                     shard_rows=8)
    assert parallel.fingerprint == serial.fingerprint and parallel.reused_shards == 0


def test_mimic_build_counts_every_skip(tmp_path):
    root = tmp_path / "mimic"
    expected = write_mimic_tree(root)
    cfg = config.resolve("tiny", data_source="mimic", mimic_root=str(root), n_images=None,
                         output_dir=str(tmp_path / "out"))
    result = dataset.build_dataset(cfg)
    skipped = result.skipped.set_index("reason")["count"]
    for reason in set(expected.values()) - {"ok"}:
        assert skipped[reason] == list(expected.values()).count(reason), reason
    rows = {name: len(split) for name, split in result.dataset.items()}
    assert rows == {"train": 5, "validation": 1, "test": 1}
    assert {im.mode for im in result.dataset["train"]["image"]} == {"L"}
    prompts = dict(zip(result.dataset["train"]["image_id"], result.dataset["train"]["prompt"]))
    assert prompts["d15"] == prompts["d14"] == "Small right pleural effusion. No pneumothorax."
    item = result.dataset["train"][0]
    assert item["prompt"] == "Small right pleural effusion. No pneumothorax."
    assert item["Pleural Effusion"] == 1.0 and item["Pneumothorax"] == 0.0
    assert item["image"].size == (32, 32) and item["image"].mode == "L"


def test_the_smoke_tree_reads_as_mimic_cxr_with_its_laterals_skipped(tmp_path):
    root = mimic_standin.write_standin_tree(tmp_path / "mimic", studies=20, side=64)
    cfg = config.resolve("tiny", data_source="mimic", mimic_root=str(root), n_images=None, output_dir=str(tmp_path / "out"))
    result = dataset.build_dataset(cfg)
    assert result.skipped.set_index("reason")["count"]["non_frontal_view"] == 5  # every fourth study's lateral
    assert {name: len(split) for name, split in result.dataset.items()} == {"train": 16, "validation": 2, "test": 2}
    prompts = result.dataset["train"]["prompt"]
    assert all(p and "XXXX" not in p for p in prompts)  # IU-Xray's de-identification marks become MIMIC's "___"
    assert {im.size for im in result.dataset["train"]["image"]} == {(32, 32)}


def test_mimic_root_is_required_to_build_and_only_then(tmp_path):
    cfg = config.resolve("paper", output_dir=str(tmp_path / "dataset"))  # 02-06 read the dataset, not MIMIC
    with pytest.raises(mimic.MimicLayoutError, match="'mimic_root' is required to build a dataset"):
        dataset.build_dataset(cfg)


def test_mimic_missing_paths_are_named(tmp_path):
    with pytest.raises(mimic.MimicLayoutError, match="mimic_root='.*nowhere' is not a folder"):
        mimic.check_layout(tmp_path / "nowhere", tmp_path / "nowhere")
    with pytest.raises(mimic.MimicLayoutError, match="mimic-cxr-2.0.0-metadata.csv.gz not found"):
        mimic.check_layout(tmp_path, tmp_path)


def test_mimic_leakage_is_refused(tmp_path):
    import datasets

    splits = {"train": datasets.Dataset.from_dict({"subject_id": ["1", "2"]}),
              "test": datasets.Dataset.from_dict({"subject_id": ["2"]})}
    with pytest.raises(ValueError, match="patient 2 is in both 'train' and 'test'"):
        dataset.check_patient_disjoint(splits)


def test_a_script_without_a_main_guard_gets_told_how_to_fix_it(tmp_path):
    """Worker processes re-import the calling script; unguarded, they die, and the error says why."""
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text("from roentgen_lib import config\nfrom roentgen_lib.data import dataset\n"
                      f"dataset.build_dataset(config.resolve('tiny', data_workers=2, output_dir={str(tmp_path / 'd')!r}),"
                      " shard_rows=8)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and 'put the call under `if __name__ == "__main__":`' in done.stderr
