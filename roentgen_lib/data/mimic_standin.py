"""A MIMIC-CXR-JPG-format tree built from the phantom world: what the paper_smoke profile reads offline.

The layout, file names, metadata and split tables are MIMIC-CXR's (see `mimic`), so the paper path's
code reads it exactly as it reads a credentialed copy. The images are phantom radiographs drawn from
real IU-Xray reports, whose FINDINGS and IMPRESSION become the study's report; a few studies add a
lateral view, which the dataset build skips. No patient data is involved.

    python -m roentgen_lib.data.mimic_standin data/paper_smoke/mimic --studies 32     # `make smoke-paper`
"""

from __future__ import annotations

import argparse
import gzip
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from roentgen_lib.data.masks import load_lung_masks
from roentgen_lib.data.mimic import METADATA_FILE, SPLIT_FILE, study_folder
from roentgen_lib.data.phantom import render, render_size
from roentgen_lib.files import replace_dir, temporary_sibling
from roentgen_lib.text.labels import device_kinds, label_report
from roentgen_lib.text.reports import read_iu_reports

RENDERED = 256  # the phantom's side before it is scaled up to `side`
DEIDENTIFIED = re.compile(r"X{2,}")  # IU-Xray's mark for removed words; MIMIC-CXR writes "___"
SPLITS = ("train",) * 8 + ("validate", "test")  # MIMIC's names, by patient


def report_text(findings: str, impression: str) -> str:
    """A report laid out as MIMIC-CXR's free-text files are, with its de-identification marks."""
    findings, impression = (DEIDENTIFIED.sub("___", t) for t in (findings, impression))
    return (f"                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
            f" FINDINGS:\n {findings}\n\n IMPRESSION:\n {impression}\n")


def write_standin_tree(root: Path, studies: int = 32, side: int = 768, seed: int = 0) -> Path:
    """Write `studies` studies (one frontal image each, every fourth with a lateral too) under `root`, atomically."""
    rng = np.random.default_rng(seed)
    reports = [r for r in read_iu_reports() if r.sections.get("FINDINGS") and r.sections.get("IMPRESSION")]
    masks = load_lung_masks(render_size(RENDERED))
    work = temporary_sibling(Path(root))
    meta, split = [], []
    for k, chosen in enumerate(rng.choice(len(reports), studies, replace=False)):
        report = reports[chosen]
        subject, study = f"1{k // 2:07d}", f"5{k:07d}"  # two studies per patient
        folder = work / study_folder(subject, study)
        folder.mkdir(parents=True)
        text = f"{report.sections['IMPRESSION']} {report.sections['FINDINGS']}"
        image, _ = render(label_report(text), masks[rng.integers(len(masks))], rng, RENDERED, tuple(device_kinds(text)))
        views = ["PA"] + (["LATERAL"] if k % 4 == 3 else [])
        for v, view in enumerate(views):
            dicom = f"{study}-{v}"
            Image.fromarray(image if view == "PA" else image.T.copy()).resize((side, side)).save(folder / f"{dicom}.jpg",
                                                                                                 quality=90)
            meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study, "ViewPosition": view})
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": SPLITS[(k // 2) % len(SPLITS)]})
        folder.with_suffix(".txt").write_text(report_text(report.sections["FINDINGS"], report.sections["IMPRESSION"]))
    for name, rows in ((METADATA_FILE, meta), (SPLIT_FILE, split)):
        with gzip.open(work / name, "wt") as handle:
            pd.DataFrame(rows).to_csv(handle, index=False)
    replace_dir(work, Path(root))
    return Path(root)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: write the tree unless one is there."""
    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.data.mimic_standin", description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--studies", type=int, default=32)
    parser.add_argument("--side", type=int, default=768, help="image side in pixels")
    args = parser.parse_args(argv)
    if not (args.root / METADATA_FILE).is_file():
        write_standin_tree(args.root, args.studies, args.side)
    print(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
