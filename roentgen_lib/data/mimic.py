"""MIMIC-CXR-JPG image/report pairs from a local, credentialed copy (never leaves the user's disk).

Layout expected under `mimic_root` (as PhysioNet distributes it)::

    mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train/validate/test)
    files/pNN/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg

and the reports under `mimic_reports_root` (default: the same folder) as
`files/pNN/pNNNNNNNN/sNNNNNNNN.txt`. Only frontal views (PA, AP) are kept; the official split is
patient-disjoint and is used as is ("validate" is called "validation" here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from roentgen_lib.text.reports import parse_mimic_sections, read_report_file, report_prompt

METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
FRONTAL_VIEWS = ("PA", "AP")
SPLIT_NAMES = {"train": "train", "validate": "validation", "validation": "validation", "test": "test"}


class MimicLayoutError(FileNotFoundError):
    """A MIMIC-CXR path is missing or not laid out as expected; the message names the path."""


def check_layout(mimic_root: str | Path | None, reports_root: str | Path | None) -> None:
    """Fail before any work when a root folder or a metadata file is missing.

    Only building the dataset (01) reads MIMIC-CXR, so only it needs `mimic_root`; later notebooks of the
    paper profile read the dataset it built.
    """
    if not mimic_root:
        raise MimicLayoutError("parameter 'mimic_root' is required to build a dataset from data_source='mimic': "
                               "the folder holding files/ and mimic-cxr-2.0.0-metadata.csv.gz")
    for name, root in (("mimic_root", mimic_root), ("mimic_reports_root", reports_root)):
        if not Path(root).is_dir():
            raise MimicLayoutError(f"{name}={str(root)!r} is not a folder; point it at your MIMIC-CXR-JPG copy")
    for filename in (METADATA_FILE, SPLIT_FILE):
        if not (Path(mimic_root) / filename).is_file():
            raise MimicLayoutError(f"{filename} not found in mimic_root={str(mimic_root)!r}")


def read_studies(mimic_root: str | Path) -> pd.DataFrame:
    """Metadata joined with the official split: one row per image (dicom_id)."""
    meta = pd.read_csv(Path(mimic_root) / METADATA_FILE, dtype=str)
    split = pd.read_csv(Path(mimic_root) / SPLIT_FILE, dtype=str)[["dicom_id", "split"]]
    table = meta.merge(split, on="dicom_id", how="left")
    table["split"] = table["split"].map(SPLIT_NAMES)
    return table.sort_values("dicom_id", kind="stable").reset_index(drop=True)


def study_folder(subject_id: str, study_id: str) -> Path:
    """files/pNN/pNNNNNNNN/sNNNNNNNN relative to a root."""
    return Path("files") / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


def plan_rows(studies: pd.DataFrame, n_images: int | None, seed: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Frontal images with a split, a seeded sample of n_images of them, and what was skipped.

    A dicom id listed twice in the metadata is kept once (its first row), the repeats counted.
    """
    repeated = studies["dicom_id"].duplicated(keep="first")
    studies = studies[~repeated]
    frontal = studies["ViewPosition"].isin(FRONTAL_VIEWS)
    unsplit = studies["split"].isna()
    skipped = {"non_frontal_view": int((~frontal).sum()), "not_in_split_file": int((frontal & unsplit).sum()),
               "duplicate_dicom_id": int(repeated.sum())}
    rows = studies[frontal & ~unsplit]
    if n_images is not None and n_images < len(rows):
        order = np.random.default_rng(seed).permutation(len(rows))[:n_images]
        rows = rows.iloc[np.sort(order)]
    return rows.reset_index(drop=True), skipped


def load_image(path: Path, size: int) -> Image.Image:
    """Grayscale, center-cropped and resized to size x size; 16-bit images are rescaled, not clipped."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I"):
            array = np.asarray(image, dtype=np.float64)
            span = max(array.max() - array.min(), 1.0)
            image = Image.fromarray(np.round(255 * (array - array.min()) / span).astype(np.uint8))
        return ImageOps.fit(image.convert("L"), (size, size), method=Image.BICUBIC)


def load_pair(row: pd.Series, mimic_root: Path, reports_root: Path, size: int) -> tuple[Image.Image, str] | str:
    """The (image, prompt) of one metadata row, or the reason it is skipped."""
    folder = study_folder(row["subject_id"], row["study_id"])
    image_path = mimic_root / folder / f"{row['dicom_id']}.jpg"
    report_path = (reports_root / folder).with_suffix(".txt")
    if not image_path.is_file():
        return "missing_image"
    if not report_path.is_file():
        return "missing_report"
    prompt = report_prompt(parse_mimic_sections(read_report_file(report_path)))
    if prompt is None:
        return "no_impression_or_findings"
    try:
        return load_image(image_path, size), prompt
    except Image.DecompressionBombError:  # over 2 x PIL's pixel limit: a corrupt header or not a radiograph
        return "image_too_large"
    except (UnidentifiedImageError, OSError, ValueError):
        return "unreadable_image"
