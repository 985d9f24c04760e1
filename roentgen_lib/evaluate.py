"""Evaluation: a finding classifier trained on real images scores synthetic ones.

The classifier (a small CNN, trained by the project in about a minute on the demo profile) reads
a radiograph and predicts, per finding, whether it is present; for effusion and pneumothorax also
the side (left / right / bilateral) and the size (small / moderate / large). It learns from the
real training split: on the phantom world from what the renderer actually drew (exact ground
truth), on MIMIC-CXR from the report labels. Synthetic images are then scored against what their
prompts asked for:

- alignment: AUROC per finding of the predicted presence against the prompt's intended label;
- controllability: of the images whose prompt names a side (or size), how often the classifier
  reads that side (small vs large) - with confusion tables.

Tables are tidy: one row per model x prompt set x finding x metric.

Usage::

    truth = truth_table(real["train"])
    net = train_classifier(images_array(real["train"], cfg.image_size), truth, seed=0)
    alignment_table(predict(net, images_array(synthetic, size)), truth_table(synthetic), model="both")
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

FINDINGS = ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Edema", "Consolidation")
LATERAL = ("Pleural Effusion", "Pneumothorax")
SIDES = ("left", "right", "bilateral")
SIZES = ("small", "moderate", "large")


def labels_of_row(row: dict) -> dict[str, dict]:
    """What an image shows, in the labeler's format ({finding: {status, laterality, severity}}).

    Phantom images carry what the renderer drew (`drawn`); real images their report labels;
    synthetic images what the prompt asked for (`intended`).
    """
    if row.get("drawn"):
        drawn = json.loads(row["drawn"])
        return {f: {"status": "positive", "laterality": a.get("side"), "severity": a.get("severity")}
                for f, a in drawn.items() if not f.startswith("_")}
    return json.loads(row.get("intended") or row["report_labels"])


def truth_table(split) -> pd.DataFrame:
    """Per image: presence (1/0) of each finding, and side / size (or None) of the lateral findings."""
    columns = [c for c in ("drawn", "intended", "report_labels") if c in split.column_names]
    if not columns:
        raise ValueError(f"no ground truth in columns {split.column_names}: expected drawn, intended or report_labels")
    rows = []
    for row in split.select_columns(columns):
        labels = labels_of_row(row)
        entry = {f: float(labels.get(f, {}).get("status") == "positive") for f in FINDINGS}
        for f in LATERAL:
            positive = entry[f] == 1.0
            entry[f"{f} side"] = labels[f].get("laterality") if positive else None
            entry[f"{f} size"] = labels[f].get("severity") if positive else None
        rows.append(entry)
    return pd.DataFrame(rows)


def images_array(split, size: int) -> np.ndarray:
    """uint8 (N, size, size) grey images of a dataset split."""
    return np.stack([np.asarray(im.convert("L").resize((size, size))) for im in split["image"]])


class FindingNet(nn.Module):
    """A small CNN: four strided conv stages, global pooling, one head per question."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.presence = nn.Linear(channels, len(FINDINGS))
        self.side = nn.Linear(channels, len(LATERAL) * len(SIDES))
        self.size = nn.Linear(channels, len(LATERAL) * len(SIZES))
        self.feature_width = channels

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images)
        return {"features": features, "presence": self.presence(features),
                "side": self.side(features).view(-1, len(LATERAL), len(SIDES)),
                "size": self.size(features).view(-1, len(LATERAL), len(SIZES))}


def targets(truth: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Tensors for training: presence (N, F) and side / size class indices (N, L), -1 where unknown."""
    def index(values, names):
        return torch.tensor([names.index(v) if v in names else -1 for v in values])
    return {"presence": torch.tensor(truth[list(FINDINGS)].to_numpy(), dtype=torch.float32),
            "side": torch.stack([index(truth[f"{f} side"], SIDES) for f in LATERAL], dim=1),
            "size": torch.stack([index(truth[f"{f} size"], SIZES) for f in LATERAL], dim=1)}


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0


def classifier_loss(out: dict, target: dict) -> torch.Tensor:
    """Presence BCE plus side and size cross-entropy where they are known."""
    loss = nn.functional.binary_cross_entropy_with_logits(out["presence"], target["presence"])
    for head in ("side", "size"):
        known = target[head] >= 0
        if known.any():
            loss = loss + nn.functional.cross_entropy(out[head][known], target[head][known])
    return loss


def train_classifier(images: np.ndarray, truth: pd.DataFrame, seed: int, epochs: int = 12, batch_size: int = 64,
                     learning_rate: float = 2e-3, progress: bool = False) -> FindingNet:
    """Train FindingNet on real images and their truth (random shifts as augmentation); returns it in eval mode."""
    torch.manual_seed(seed)
    net = FindingNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    x, target = to_input(images), targets(truth)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc="train classifier", disable=not progress):
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))
            loss = classifier_loss(net(batch), {k: v[idx] for k, v in target.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


@torch.no_grad()
def predict(net: FindingNet, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Presence probabilities (N, F), side and size probabilities (N, L, 3) and features (N, D)."""
    outs = [net(to_input(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    joined = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return {"presence": torch.sigmoid(joined["presence"]).numpy(), "side": joined["side"].softmax(-1).numpy(),
            "size": joined["size"].softmax(-1).numpy(), "features": joined["features"].numpy()}


def alignment_table(prediction: dict, truth: pd.DataFrame, **keys: str) -> pd.DataFrame:
    """AUROC per finding of predicted presence against the truth (NaN when a class is missing)."""
    rows = []
    for k, finding in enumerate(FINDINGS):
        y = truth[finding].to_numpy()
        value = roc_auc_score(y, prediction["presence"][:, k]) if 0 < y.sum() < len(y) else float("nan")
        rows.append({**keys, "finding": finding, "metric": "AUROC", "value": round(float(value), 4),
                     "positives": int(y.sum()), "negatives": int(len(y) - y.sum())})
    return pd.DataFrame(rows)


def controllability_table(prediction: dict, truth: pd.DataFrame, **keys: str) -> pd.DataFrame:
    """Side accuracy (left vs right) and size accuracy (small vs large) where the truth names them."""
    rows = []
    for k, finding in enumerate(LATERAL):
        for head, names, asked in (("side", SIDES, ("left", "right")), ("size", SIZES, ("small", "large"))):
            wanted = truth[f"{finding} {head}"].isin(asked).to_numpy()
            columns = [names.index(a) for a in asked]
            chosen = np.array(asked)[prediction[head][wanted, k][:, columns].argmax(axis=1)] if wanted.any() else []
            correct = (chosen == truth[f"{finding} {head}"].to_numpy()[wanted]).mean() if wanted.any() else float("nan")
            rows.append({**keys, "finding": finding, "metric": f"{head} correct ({' vs '.join(asked)})",
                         "value": round(float(correct), 4), "images": int(wanted.sum())})
    return pd.DataFrame(rows)
