"""Real lung shapes for the phantom world: the v7labs lung masks torchxrayvision ships.

Each usable mask (two lungs found) is cropped to the lungs, placed in a canonical frame and split
into the patient's right lung (label 1, on the viewer's left, as radiographs are displayed) and the
patient's left lung (label 2). Masks with fewer than two lung-sized regions are dropped.
"""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from roentgen_lib.config import shipped_file

MASKS_FILE = "data/semantic_masks_v7labs_lungs.zip"
RIGHT_LUNG, LEFT_LUNG = 1, 2  # patient sides; the patient's right lung is on the image's left
LUNG_BOX = (0.10, 0.90, 0.10, 0.80)  # canonical x0, x1, y0, y1 of the lungs in the frame
MIN_LUNG_BALANCE = 0.3  # the smaller lung must have at least this share of the larger's area


def two_lungs(binary: np.ndarray) -> np.ndarray | None:
    """Label the two largest regions as right (viewer's left) and left lung, or None if not lungs."""
    regions, count = ndimage.label(binary)
    if count < 2:
        return None
    sizes = ndimage.sum(binary, regions, range(1, count + 1))
    first, second = np.argsort(sizes)[::-1][:2] + 1
    if sizes[second - 1] < MIN_LUNG_BALANCE * sizes[first - 1]:
        return None
    x_first = ndimage.center_of_mass(regions == first)[1]
    x_second = ndimage.center_of_mass(regions == second)[1]
    viewer_left, viewer_right = (first, second) if x_first < x_second else (second, first)
    labelled = np.zeros(binary.shape, np.uint8)
    labelled[regions == viewer_left] = RIGHT_LUNG
    labelled[regions == viewer_right] = LEFT_LUNG
    return labelled


def frame_lungs(labelled: np.ndarray, size: int) -> np.ndarray:
    """Crop to the lungs and resize them into LUNG_BOX of a size x size frame (nearest labels)."""
    rows, cols = np.nonzero(labelled)
    crop = labelled[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    x0, x1, y0, y1 = (round(v * size) for v in LUNG_BOX)
    resized = Image.fromarray(crop).resize((x1 - x0, y1 - y0), Image.NEAREST)
    frame = np.zeros((size, size), np.uint8)
    frame[y0:y1, x0:x1] = np.asarray(resized)
    return frame


@lru_cache(maxsize=4)
def load_lung_masks(size: int = 128) -> np.ndarray:
    """All usable lung masks as an (N, size, size) uint8 array of 0 / RIGHT_LUNG / LEFT_LUNG."""
    masks = []
    with zipfile.ZipFile(shipped_file("torchxrayvision", MASKS_FILE)) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith("/"):
                continue
            image = Image.open(io.BytesIO(archive.read(name))).convert("L")
            image.thumbnail((256, 256))  # some masks are photographs' size; lungs need no more
            labelled = two_lungs(np.asarray(image) > 200)
            if labelled is not None:
                masks.append(frame_lungs(labelled, size))
    masks_array = np.stack(masks)
    masks_array.flags.writeable = False  # shared through the cache
    return masks_array
