"""The memorization audit: each synthetic image's nearest training image, in feature and pixel space,
searched in chunks so memory stays flat in the training set's size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from roentgen_lib.models import compute_device


PIXEL_SEARCH_SIZE = 64  # side of the images the pixel-space near-copy search compares

def nearest_distances(queries: np.ndarray, references: np.ndarray, exclude_self: bool = False, divisor: float = 1.0,
                      chunk: int = 512, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest reference row (rows over `divisor`), and its index.

    Queries and references are compared `chunk` rows against `chunk` rows on `device` (default `compute_device()`),
    each chunk turned into floats only when it is compared, so memory stays flat in their number.
    """
    device = device or compute_device()
    as_floats = lambda rows: torch.from_numpy(np.asarray(rows, dtype=np.float32) / np.float32(divisor)).to(device)  # noqa: E731
    best, where = [], []
    for start in range(0, len(queries), chunk):
        q = as_floats(queries[start : start + chunk])
        value, index = torch.full((len(q),), float("inf"), device=device), torch.zeros(len(q), dtype=torch.long, device=device)
        for ref_start in range(0, len(references), chunk):
            d = torch.cdist(q, as_floats(references[ref_start : ref_start + chunk]))
            if exclude_self:
                rows = torch.arange(len(q), device=device)
                own = rows + start - ref_start
                inside = (own >= 0) & (own < d.shape[1])
                d[rows[inside], own[inside]] = float("inf")
            chunk_value, chunk_index = d.min(dim=1)
            closer = chunk_value < value
            value, index = torch.where(closer, chunk_value, value), torch.where(closer, chunk_index + ref_start, index)
        # cdist's matrix-product shortcut rounds at the scale of the vectors' norms (on one CPU an exact
        # copy came out 0.008 away), so the distance to the neighbour it found is computed exactly.
        nearest = as_floats(references[index.cpu().numpy()])
        best.append(torch.linalg.vector_norm(q - nearest, dim=1).cpu())
        where.append(index.cpu())
    return torch.cat(best).numpy(), torch.cat(where).numpy()


def pixel_rows(images: np.ndarray) -> np.ndarray:
    """uint8 grey images as pixel rows for near-copy search, at most `PIXEL_SEARCH_SIZE` pixels a side.

    A copy stays a copy at any resolution; at 512 px an all-pairs search over a training set would
    compare 262,144 numbers per pair.
    """
    if images.shape[-1] > PIXEL_SEARCH_SIZE:
        images = np.stack([np.asarray(Image.fromarray(im).resize((PIXEL_SEARCH_SIZE,) * 2, Image.Resampling.BOX))
                           for im in images])
    return images.reshape(len(images), -1)


def near_copy_thresholds(train: np.ndarray, train_features: np.ndarray, quantile: float = 0.01,
                         device: torch.device | None = None) -> dict[str, float]:
    """Per space, the `quantile` of training images' distances to their nearest other training image.

    Different patients in the training set are the benchmark for "too close". Depends on the training
    set only, so 05 computes it once for every model it audits.
    """
    return {space: float(np.quantile(nearest_distances(reference, reference, True, divisor, device=device)[0], quantile))
            for space, reference, divisor in (("pixel", pixel_rows(train), 255.0), ("feature", train_features, 1.0))}


def memorization_audit(synthetic: np.ndarray, train: np.ndarray, synthetic_features: np.ndarray,
                       train_features: np.ndarray, thresholds: dict[str, float] | None = None,
                       device: torch.device | None = None) -> pd.DataFrame:
    """For each synthetic image, its nearest training image in pixel and feature space, and a near-copy flag.

    A synthetic image is flagged when it lies closer to a training image than the threshold of that
    space (`near_copy_thresholds`, computed here when not given). Runs on any synthetic dataset.
    """
    thresholds = thresholds or near_copy_thresholds(train, train_features, device=device)
    frame = {}
    for space, query, reference, divisor in (("pixel", pixel_rows(synthetic), pixel_rows(train), 255.0),
                                             ("feature", synthetic_features, train_features, 1.0)):
        distance, index = nearest_distances(query, reference, divisor=divisor, device=device)
        frame[f"{space} distance"] = distance
        frame[f"{space} nearest"] = index
        frame[f"{space} threshold"] = thresholds[space]
        frame[f"{space} flagged"] = distance < thresholds[space]
    table = pd.DataFrame(frame)
    table["flagged"] = table["pixel flagged"] | table["feature flagged"]
    return table


def memorization_summary(audit: pd.DataFrame, **keys) -> pd.DataFrame:
    """Share of synthetic images flagged as near-copies, per space and overall."""
    return pd.DataFrame([{**keys, "metric": f"near-copies ({name})", "value": round(float(audit[column].mean()), 4),
                          "images": len(audit)}
                         for name, column in (("pixel", "pixel flagged"), ("feature", "feature flagged"),
                                              ("either", "flagged"))])
