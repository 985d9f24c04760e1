"""Alignment and controllability: does an image show what its prompt asked for, as the judge reads it.

- alignment: AUROC per finding of the predicted presence against the prompt's intended label;
- controllability: of the images whose prompt names a side (or size), how often the judge reads that
  side (small vs large), with confusion tables and Wilson intervals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from roentgen_lib.evaluate.judge import FINDINGS, LATERAL, SIDES, SIZES


def alignment_table(prediction: dict, truth: pd.DataFrame, metric: str = "AUROC", **keys: str) -> pd.DataFrame:
    """AUROC per finding of predicted presence against the truth (NaN when a class is missing)."""
    rows = []
    for k, finding in enumerate(FINDINGS):
        y = truth[finding].to_numpy()
        value = roc_auc_score(y, prediction["presence"][:, k]) if 0 < y.sum() < len(y) else float("nan")
        rows.append({**keys, "finding": finding, "metric": metric, "value": round(float(value), 4),
                     "positives": int(y.sum()), "negatives": int(len(y) - y.sum())})
    return pd.DataFrame(rows)


CONTROL_QUESTIONS = (("side", SIDES, ("left", "right")), ("size", SIZES, ("small", "large")))
NOT_FOUND = "not found"


def read_control(prediction: dict, truth: pd.DataFrame, finding: str, head: str, names: tuple[str, ...],
                 asked: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of the images whose prompt asks for one of `asked` (a side or size of `finding`): what was asked,
    what the judge reads (the likelier of `asked`, or "not found" where it finds no `finding`), and
    whether it found the finding."""
    wanted = truth[f"{finding} {head}"].isin(asked).to_numpy()
    found = prediction["presence"][wanted, FINDINGS.index(finding)] >= 0.5
    columns = [names.index(a) for a in asked]
    chosen = np.array(asked)[prediction[head][wanted, LATERAL.index(finding)][:, columns].argmax(axis=1)]
    return truth[f"{finding} {head}"].to_numpy()[wanted], np.where(found, chosen, NOT_FOUND), found


def controllability_table(prediction: dict, truth: pd.DataFrame, **keys: str) -> pd.DataFrame:
    """Side accuracy (left vs right) and size accuracy (small vs large) where the truth names them.

    An image counts as correct only when the judge also finds the finding in it (presence >= 0.5):
    where it is missing, the side and size heads would be reading a finding that is not there (a model
    that draws no small pneumothorax would otherwise score its size as "small" by chance). `present`
    is the share of those images in which the finding was found. `ci low` / `ci high`: the Wilson 95%
    interval of the share, which says how far from a target a few dozen images can tell a model to be.
    """
    rows = []
    for finding in LATERAL:
        for head, names, asked in CONTROL_QUESTIONS:
            requested, read, found = read_control(prediction, truth, finding, head, names, asked)
            right, n = read == requested, len(requested)
            low, high = wilson_interval(int(right.sum()), n)
            rows.append({**keys, "finding": finding, "metric": f"{head} correct ({' vs '.join(asked)})",
                         "value": round(float(right.mean()), 4) if n else float("nan"), "ci low": low, "ci high": high,
                         "images": n, "present": round(float(found.mean()), 4) if n else float("nan")})
    return pd.DataFrame(rows)


def confusion_table(prediction: dict, truth: pd.DataFrame, **keys: str) -> pd.DataFrame:
    """What the prompts asked against what the judge reads, per finding and question (side, size): one
    row per asked x read with its image count. The diagonal's sum over the table's total is
    `controllability_table`'s share; the "not found" column shows how much of a miss is a finding not
    drawn at all."""
    rows = []
    for finding in LATERAL:
        for head, names, asked in CONTROL_QUESTIONS:
            requested, read, _ = read_control(prediction, truth, finding, head, names, asked)
            rows += [{**keys, "finding": finding, "question": head, "asked": a, "read": r,
                      "images": int(((requested == a) & (read == r)).sum())} for a in asked for r in (*asked, NOT_FOUND)]
    return pd.DataFrame(rows)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a share (NaN, NaN without trials): it stays inside [0, 1] at 0 or all."""
    if trials == 0:
        return float("nan"), float("nan")
    interval = binomtest(successes, trials).proportion_ci(level, method="wilson")
    return round(float(interval.low), 4), round(float(interval.high), 4)


def interval_table(rows: pd.DataFrame, index: list[str], columns: list[str]) -> pd.DataFrame:
    """Rows with `value`, `ci low` and `ci high` pivoted into "0.71 (0.51-0.85)" cells, for reading at a glance."""
    cells = rows.assign(cell=[f"{v:.2f} ({lo:.2f}-{hi:.2f})" if pd.notna(v) else "-"
                              for v, lo, hi in zip(rows["value"], rows["ci low"], rows["ci high"])])
    return cells.pivot_table(index=index, columns=columns, values="cell", aggfunc="first")
