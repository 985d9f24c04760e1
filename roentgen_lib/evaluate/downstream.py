"""Downstream augmentation: classifiers trained on real, real + synthetic and synthetic images, scored on
the real test set."""

from __future__ import annotations

import numpy as np
import pandas as pd

from roentgen_lib.evaluate.alignment import alignment_table
from roentgen_lib.evaluate.judge import LATERAL, predict, train_classifier
from roentgen_lib.parallel import run_jobs


def presence_only(truth: pd.DataFrame) -> pd.DataFrame:
    """The truth with side and size unknown, so a classifier learns finding presence alone.

    The downstream classifier answers the paper's question (is the finding there?). Trained with
    the judge's side and size heads on the IU-Xray part of the demo world (33 of its 49 effusions
    bilateral), its effusion AUROC came out inverted (0.07; presence only: 0.98, seed 0).
    """
    blank = truth.copy()
    for finding in LATERAL:
        blank[f"{finding} side"], blank[f"{finding} size"] = None, None
    return blank


def downstream_table(train_sets: dict[str, tuple[np.ndarray, pd.DataFrame]], test_images: np.ndarray,
                     test_truth: pd.DataFrame, seeds: list[int], epochs: int = 12, processes: int = 1,
                     progress: bool = False) -> pd.DataFrame:
    """Train a presence classifier on each named training set with each seed; AUROC per finding on the real test set.

    The classifiers train `processes` at a time, each in its own process (see `parallel`).
    """
    jobs = {f"{name}, seed {seed}": (images, truth, seed, epochs, test_images, test_truth, name)
            for name, (images, truth) in train_sets.items() for seed in seeds}
    tables = run_jobs(downstream_scores, jobs, processes, desc="downstream classifiers" if progress else None)
    return pd.concat(tables.values(), ignore_index=True)


def downstream_scores(images: np.ndarray, truth: pd.DataFrame, seed: int, epochs: int, test_images: np.ndarray,
                      test_truth: pd.DataFrame, name: str) -> pd.DataFrame:
    """AUROC per finding on the test set of one presence classifier trained on (images, truth) with `seed`."""
    net = train_classifier(images, presence_only(truth), seed=seed, epochs=epochs)
    table = alignment_table(predict(net, test_images), test_truth, training=name, seed=str(seed))
    table["train images"] = len(images)
    return table
