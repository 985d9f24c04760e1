"""The phantom radiographs 04 edits: each rendered from a source report, with the lung an edit is meant to
change and the prompt that asks for it. Sampling (`sample.edit`) takes their images and prompts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from roentgen_lib.data.masks import LEFT_LUNG, RIGHT_LUNG, load_lung_masks
from roentgen_lib.data.phantom import render, render_size
from roentgen_lib.text.labels import label_report


@dataclass
class EditCase:
    """A phantom radiograph, the lung region an edit is meant to change, and the two prompts."""

    image: np.ndarray  # uint8 (H, W)
    region: np.ndarray  # bool (H, W): the hemithorax the edit names
    source_prompt: str
    edit_prompt: str


EDIT_CASES = (  # (what the phantom shows, what the edit asks for, the side it concerns)
    ("no acute cardiopulmonary process.", "large right pneumothorax.", "right"),
    ("no acute cardiopulmonary process.", "large left pleural effusion.", "left"),
    ("large left pleural effusion.", "no pleural effusion. no acute cardiopulmonary process.", "left"),
    ("large right pneumothorax.", "no pneumothorax. no acute cardiopulmonary process.", "right"),
)


def phantom_edit_cases(size: int, seed: int, cases: tuple = EDIT_CASES) -> list[EditCase]:
    """Phantoms rendered from each case's source prompt, with the named side's lung (dilated) as region."""
    masks = load_lung_masks(render_size(size))
    factor = render_size(size) // size
    out = []
    for k, (source, target, side) in enumerate(cases):
        rng = np.random.default_rng([seed, 7, k])
        mask = masks[rng.integers(len(masks))]
        image, _ = render(label_report(source), mask, rng, size)
        lung = (mask == (RIGHT_LUNG if side == "right" else LEFT_LUNG))[::factor, ::factor]
        out.append(EditCase(image, ndimage.binary_dilation(lung, iterations=max(1, size // 16)), source, target))
    return out
