"""Check the rule labeler against the MeSH tags that indexers assigned to the IU-Xray reports.

A MeSH major tag such as "Pleural Effusion/right/small" names a finding and its qualifiers. We map
its first term to a CheXpert observation and compare with the labeler run on the same report text
(FINDINGS + IMPRESSION, from which the tags were assigned). Only positive mentions count ("U-zeros"):
the indexers rarely tagged hedged findings ("may represent pneumonia"), which measurably fits better.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from roentgen_lib.text.labels import OBSERVATIONS, label_report
from roentgen_lib.text.reports import Report

MESH_TO_CHEXPERT = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Pulmonary Edema": "Edema",
    "Edema": "Edema",
    "Pulmonary Congestion": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity",
    "Infiltrate": "Lung Opacity",
    "Pulmonary Atelectasis": "Atelectasis",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Medical Device": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Stents": "Support Devices",
}
# Pairs scored together, as the issue asks for "Consolidation/Pneumonia".
COMBINED = {"Consolidation/Pneumonia": ("Consolidation", "Pneumonia")}
TARGETS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema", "Consolidation/Pneumonia")


def mesh_observations(mesh: Sequence[str]) -> set[str]:
    """CheXpert observations named by a report's MeSH major tags."""
    terms = {tag.split("/")[0].strip() for tag in mesh}
    return {MESH_TO_CHEXPERT[t] for t in terms if t in MESH_TO_CHEXPERT}


def predicted_observations(text: str) -> set[str]:
    """Observations the labeler finds positive in a report text (uncertain mentions do not count)."""
    return {obs for obs, lab in label_report(text).items() if lab["status"] == "positive"}


def agreement_frame(reports: Sequence[Report]) -> pd.DataFrame:
    """One row per report: its id, text, the MeSH observations and the labeler's observations."""
    rows = [
        {
            "report_id": r.report_id,
            "text": r.full_text,
            "mesh": sorted(mesh_observations(r.mesh)),
            "labeler": sorted(predicted_observations(r.full_text)),
        }
        for r in reports
        if r.mesh and r.full_text and "No Indexing" not in r.mesh
    ]
    return pd.DataFrame(rows)


def _with_combined(observations: Sequence[str]) -> set[str]:
    found = set(observations)
    return found | {name for name, parts in COMBINED.items() if found & set(parts)}


def f1_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall, F1 and support per observation (and combined pairs), MeSH as truth."""
    truth = frame["mesh"].map(_with_combined)
    pred = frame["labeler"].map(_with_combined)
    rows = []
    for obs in [*OBSERVATIONS, *COMBINED]:
        t = truth.map(lambda s, o=obs: o in s)
        p = pred.map(lambda s, o=obs: o in s)
        tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
        if tp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"observation": obs, "support": tp + fn, "precision": precision, "recall": recall,
                     "f1": f1, "target": obs in TARGETS})
    return pd.DataFrame(rows).set_index("observation")


def disagreements(frame: pd.DataFrame, observation: str, limit: int = 10) -> pd.DataFrame:
    """Reports where MeSH and the labeler disagree on one observation, with the kind of error."""
    truth = frame["mesh"].map(lambda s: observation in _with_combined(s))
    pred = frame["labeler"].map(lambda s: observation in _with_combined(s))
    out = frame.loc[truth != pred, ["report_id", "text"]].copy()
    out["error"] = ["missed" if t else "extra" for t in truth[truth != pred]]
    return out.head(limit).reset_index(drop=True)
