"""Evaluation: ground truth from phantoms / prompts, the finding classifier, alignment and controllability."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest

from roentgen_lib import evaluate
from roentgen_lib.text.labels import label_report


def test_truth_reads_what_the_phantom_drew_over_the_report():
    drawn = json.dumps({"Pneumothorax": {"side": "right", "severity": "large"}, "_ctr": {"value": 0.45}})
    split = datasets.Dataset.from_dict({"drawn": [drawn, ""],
                                        "report_labels": [json.dumps(label_report("no pneumothorax.")),
                                                          json.dumps(label_report("small left pleural effusion."))]})
    truth = evaluate.truth_table(split)
    assert truth["Pneumothorax"].tolist() == [1.0, 0.0] and truth["Pleural Effusion"].tolist() == [0.0, 1.0]
    assert truth["Pneumothorax side"][0] == "right" and truth["Pleural Effusion size"][1] == "small"
    assert pd.isna(truth["Pneumothorax side"][1])


def test_alignment_and_controllability_count_what_they_should():
    truth = pd.DataFrame({f: [1.0, 0.0, 1.0, 0.0] for f in evaluate.FINDINGS})
    for f in evaluate.LATERAL:
        truth[f"{f} side"] = ["left", None, "right", None]
        truth[f"{f} size"] = ["small", None, "large", None]
    presence = np.tile(np.array([[0.9], [0.1], [0.4], [0.6]]), (1, len(evaluate.FINDINGS)))  # one pair mis-ordered
    side = np.zeros((4, 2, 3))
    side[:, :, 0] = 1.0  # always "left": right in the truth is missed
    prediction = {"presence": presence, "side": side, "size": side.copy()}
    align = evaluate.alignment_table(prediction, truth, model="m")
    assert align["value"].tolist() == [0.75] * len(evaluate.FINDINGS) and set(align["model"]) == {"m"}
    control = evaluate.controllability_table(prediction, truth)
    assert control["value"].tolist() == [0.5, 0.5, 0.5, 0.5]


def test_classifier_learns_a_visible_finding():
    rng = np.random.default_rng(0)
    images = rng.integers(60, 90, (96, 32, 32)).astype(np.uint8)
    truth = pd.DataFrame({f: 0.0 for f in evaluate.FINDINGS}, index=range(96))
    for f in evaluate.LATERAL:
        truth[f"{f} side"], truth[f"{f} size"] = None, None
    truth.loc[:47, "Pleural Effusion"] = 1.0
    images[:48, 20:, :16] = 230  # a bright lower band on one side
    truth.loc[:47, "Pleural Effusion side"] = "right"
    net = evaluate.train_classifier(images[::2], truth.iloc[::2].reset_index(drop=True), seed=0, epochs=6)
    held_out = evaluate.predict(net, images[1::2])
    table = evaluate.alignment_table(held_out, truth.iloc[1::2].reset_index(drop=True))
    assert table.set_index("finding").loc["Pleural Effusion", "value"] > 0.95
    assert held_out["features"].shape == (48, net.feature_width)
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate.truth_table(datasets.Dataset.from_dict({"image_id": ["x"]}))
