"""The judge: a finding classifier trained on real images that scores synthetic ones, and the truth tables it
learns from and is scored against.

The classifier (a small CNN, trained by the project in about a minute on the demo profile) reads a
radiograph and predicts, per finding, whether it is present; for effusion and pneumothorax also the side
(left / right / bilateral) and the size (small / moderate / large). It learns from the real training
split: on the phantom world from what the renderer actually drew (exact ground truth), on MIMIC-CXR from
the report labels.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from roentgen_lib.models import compute_device, reconstruct
from roentgen_lib.text.labels import label_report


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
    return truth_of_labels([labels_of_row(row) for row in split.select_columns(columns)])


def truth_of_labels(labels: list[dict[str, dict]]) -> pd.DataFrame:
    """The truth table of labels in the labeler's format, one row per image (or report)."""
    rows = []
    for entry_labels in labels:
        entry = {f: float(entry_labels.get(f, {}).get("status") == "positive") for f in FINDINGS}
        for f in LATERAL:
            positive = entry[f] == 1.0
            entry[f"{f} side"] = entry_labels[f].get("laterality") if positive else None
            entry[f"{f} size"] = entry_labels[f].get("severity") if positive else None
        rows.append(entry)
    table = pd.DataFrame(rows, columns=[*FINDINGS, *(f"{f} {h}" for f in LATERAL for h in ("side", "size"))])
    return table.astype(dict.fromkeys(FINDINGS, float))  # float even when empty (no rendered references beside MIMIC)


def truth_of_reports(texts) -> pd.DataFrame:
    """The truth table of report texts or prompts, as the labeler reads them (what a prompt asks for)."""
    return truth_of_labels([label_report(text) for text in texts])


def through_vae(vae: AutoencoderKL, images: np.ndarray, size: int, progress: bool = False) -> np.ndarray:
    """uint8 grey images as `vae` encodes and decodes them: what a fine-tune of that VAE could draw at best."""
    return reconstruct(vae, [Image.fromarray(image) for image in images], size, progress=progress)


def images_array(split, size: int) -> np.ndarray:
    """uint8 (N, size, size) grey images of a dataset split."""
    return np.stack([np.asarray(im.convert("L").resize((size, size))) for im in split["image"]])


class FindingNet(nn.Module):
    """A small CNN: four strided conv stages, global pooling, one head per question."""

    def __init__(self, width: int = 16) -> None:
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


def blur_share(batch: torch.Tensor, max_sigma: float, generator: torch.Generator, share: float = 0.5) -> torch.Tensor:
    """Gaussian-blur a random `share` of the images (N, 1, H, W), one sigma in (0, max_sigma] for the batch.

    The smoothing an autoencoder applies: a classifier trained with it reads findings, not sharpness.
    """
    sigma = float(torch.rand(1, generator=generator)) * max_sigma + 1e-3
    chosen = torch.rand(len(batch), generator=generator) < share
    kernel = 2 * math.ceil(2 * max_sigma) + 1
    return torch.where(chosen[:, None, None, None], gaussian_blur(batch, [kernel, kernel], [sigma, sigma]), batch)


def train_classifier(images: np.ndarray, truth: pd.DataFrame, seed: int, epochs: int = 12, batch_size: int = 64,
                     learning_rate: float = 2e-3, blur: float = 0.0, progress: bool = False,
                     device: torch.device | None = None) -> FindingNet:
    """Train FindingNet on real images and their truth on `device` (default `compute_device()`); returns it in eval mode.

    Augmentation: random shifts of up to 2 pixels, and with `blur` > 0 `blur_share` on every batch. The
    images stay uint8 until a batch is drawn, so a large training set is not held as floats.
    """
    torch.manual_seed(seed)
    device = device or compute_device()
    net = FindingNet().to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps)
    target = targets(truth)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in tqdm(range(epochs), desc="train classifier", disable=not progress):
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            batch = torch.roll(to_input(images[idx.numpy()]), shifts=shift, dims=(2, 3))
            if blur > 0:
                batch = blur_share(batch, blur, generator)
            loss = classifier_loss(net(batch.to(device)), {k: v[idx].to(device) for k, v in target.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def net_device(net: nn.Module) -> torch.device:
    """Where a network's weights are (the CPU for one without weights)."""
    weight = next(iter(net.parameters()), None)
    return weight.device if weight is not None else torch.device("cpu")


@torch.no_grad()
def predict(net: FindingNet, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Presence probabilities (N, F), side and size probabilities (N, L, 3) and features (N, D)."""
    outs = [{k: v.float().cpu() for k, v in net(to_input(images[i : i + batch_size]).to(net_device(net))).items()}
            for i in range(0, len(images), batch_size)]
    joined = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return {"presence": torch.sigmoid(joined["presence"]).numpy(), "side": joined["side"].softmax(-1).numpy(),
            "size": joined["size"].softmax(-1).numpy(), "features": joined["features"].numpy()}
