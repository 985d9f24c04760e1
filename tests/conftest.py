"""Shared fixtures: tiny configs pointed at temporary folders, and a generated MIMIC-format tree."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import BertConfig, BertModel, BertTokenizerFast
from xdist.scheduler import LoadScopeScheduling

from roentgen_lib import config, pretrain
from roentgen_lib.data import dataset


class NotebooksOnOneWorker(LoadScopeScheduling):
    """pytest-xdist's scheduling for `make test`: every notebook cell goes to the same worker, in order,
    since each tiny run reads what the notebook before it wrote into data/tiny; other tests spread one by one."""

    def _split_scope(self, nodeid: str) -> str:
        return "notebooks" if ".ipynb::" in nodeid else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> NotebooksOnOneWorker:
    return NotebooksOnOneWorker(config, log)


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough.

 FINDINGS:
 Heart size is normal.  There is a small right pleural effusion.

 IMPRESSION:
 Small right ___ pleural effusion.  No pneumothorax.
"""


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The tiny dataset and base, built in a temporary folder."""
    root = tmp_path_factory.mktemp("world")
    base = pretrain.build_components("tiny", 32, seed=0)
    pretrain.pretrain_vae(base.vae, 32, steps=2, batch_size=4, seed=0, progress=False)
    base.pipeline().save_pretrained(root / "base", safe_serialization=True)
    cfg = config.resolve("tiny", output_dir=str(root / "dataset"), base_model=str(root / "base"),
                         models_dir=str(root / "models"))
    dataset.build_dataset(cfg)
    return cfg


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory) -> Path:
    """A tiny BERT with its tokenizer (512-token context, as BERTs have): a stand-in domain text encoder."""
    folder = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "large", "left", "pleural", "effusion", "no"]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    bert = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512)
    BertModel(bert).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> config.Config:
    """The tiny profile writing into a temporary folder."""
    return config.resolve("tiny", output_dir=str(tmp_path / "dataset"), figures_dir=str(tmp_path / "figures"))


def write_mimic_tree(root: Path) -> dict[str, str]:
    """A small MIMIC-CXR-JPG-format tree with synthetic images and one of every kind of bad input.

    Returns the expected skip reason (or "ok") per dicom id. No real patient data is involved.
    """
    rng = np.random.default_rng(0)
    cases = {  # dicom_id: (subject, study, view, split, kind)
        "d01": ("10000001", "50000001", "PA", "train", "ok"),
        "d02": ("10000001", "50000002", "AP", "train", "ok"),
        "d03": ("10000002", "50000003", "PA", "validate", "ok"),
        "d04": ("10000003", "50000004", "PA", "test", "ok"),
        "d05": ("10000003", "50000004", "LATERAL", "test", "non_frontal_view"),
        "d06": ("10000004", "50000005", "PA", "train", "missing_image"),
        "d07": ("10000005", "50000006", "PA", "train", "unreadable_image"),
        "d08": ("10000006", "50000007", "PA", "train", "missing_report"),
        "d09": ("10000007", "50000008", "AP", "train", "no_impression_or_findings"),
        "d10": ("10000008", "50000009", "PA", "train", "zero_byte"),
        "d11": ("10000009", "50000010", "PA", "train", "truncated"),
        "d12": ("10000010", "50000011", "PA", "train", "huge"),
        "d13": ("10000011", "50000012", "PA", "train", "png16"),  # 16-bit PNG behind a .jpg name: rescaled, kept
        "d14": ("10000012", "50000013", "AP", "train", "grey_latin1"),  # greyscale JPEG, Latin-1 report
        "d15": ("10000013", "50000014", "PA", "train", "utf16"),  # report saved as UTF-16 with a BOM
        "d16": ("10000014", "50000015", "PA", "train", "blank_report"),  # whitespace-only report
    }
    meta, split = [], []
    for dicom, (subject, study, view, split_name, kind) in cases.items():
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split_name})
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"{dicom}.jpg", kind, rng)
        report = folder.with_suffix(".txt")
        if kind == "no_impression_or_findings":
            report.write_text("INDICATION: cough.\nCOMPARISON: none.\n")
        elif kind == "blank_report":
            report.write_text(" \n\t\n")
        elif kind == "grey_latin1":
            report.write_bytes(REPORT.replace("woman", "femme agée").encode("latin-1"))
        elif kind == "utf16":
            report.write_text(REPORT, encoding="utf-16")
        elif kind != "missing_report":
            report.write_text(REPORT)
    meta.append(dict(meta[0]))  # d01 listed twice in the metadata
    for name, rows in (("mimic-cxr-2.0.0-metadata.csv.gz", meta), ("mimic-cxr-2.0.0-split.csv.gz", split)):
        with gzip.open(root / name, "wt") as handle:
            pd.DataFrame(rows).to_csv(handle, index=False)
    outcome = {"zero_byte": "unreadable_image", "truncated": "unreadable_image", "huge": "image_too_large",
               "png16": "ok", "grey_latin1": "ok", "utf16": "ok", "blank_report": "no_impression_or_findings"}
    expected = {d: outcome.get(c[4], c[4]) for d, c in cases.items()}
    expected["d01 (listed twice)"] = "duplicate_dicom_id"
    return expected


def write_image(path: Path, kind: str, rng: np.random.Generator) -> None:
    """The image file of one test case (nothing for a missing image)."""
    pixels = rng.integers(0, 255, (80, 60), dtype=np.uint8)
    if kind == "unreadable_image":
        path.write_bytes(b"not a jpeg at all")
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.fromarray(pixels).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "huge":  # 225 M pixels in a 27 kB file: PIL refuses it as a decompression bomb
        Image.new("1", (15000, 15000)).save(path, format="PNG")
    elif kind == "png16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(path, format="PNG")
    elif kind == "grey_latin1":
        Image.fromarray(pixels).save(path, format="JPEG")
    elif kind != "missing_image":
        Image.fromarray(pixels).convert("RGB").save(path, format="JPEG")
