"""The general domain the demo base model is pretrained on: captioned scenes of shapes and colours.

Stable Diffusion arrives at RoentGen pretrained on natural images; our tiny stand-in arrives
pretrained on this procedurally generated world (no X-rays), so CXR fine-tuning is a real domain
adaptation, and forgetting of the general domain can be measured afterwards. A scene is a background
(flat, gradient or striped) with one or two shapes, each with a colour, a size and a position that
the caption names: "a large red circle on the left and a small blue square at the top, on a striped
yellow background". A quarter of the scenes are blurred ("a blurry photo of ...") and a quarter are
black and white ("a black and white photo of ..."), as in any large photo collection; they teach the
autoencoder the soft edges, smooth gradients and grey levels that radiographs are made of.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross")
SIZES = {"small": 0.16, "large": 0.32}
POSITIONS = {"on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
             "at the bottom": (0.5, 0.72), "in the centre": (0.5, 0.5)}
BACKGROUNDS = ("plain", "gradient", "striped", "noisy", "mottled")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
               colour: tuple[int, int, int]) -> None:
    """Draw one filled shape of `radius` (pixels) at `centre` (pixels)."""
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(1, int(radius / 3)))
    else:
        w = max(1, radius / 3)
        draw.rectangle((x - w, y - radius, x + w, y + radius), fill=colour)
        draw.rectangle((x - radius, y - w, x + radius, y + w), fill=colour)


def background(kind: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size x 3 background: plain, a left-right gradient, stripes or smooth noise."""
    base = np.ones((size, size, 3)) * np.array(colour, float)
    ramp = np.linspace(0, 1, size)[None, :, None]
    if kind == "gradient":
        base = base * (0.35 + 0.65 * ramp)
    elif kind == "striped":
        period = rng.integers(4, 10) * size / 64
        base = base * (0.6 + 0.4 * (np.sin(2 * np.pi * np.arange(size) / period) > 0))[:, None, None]
    elif kind == "noisy":
        base = base * np.clip(0.75 + 0.25 * rng.standard_normal((size, size, 1)), 0, 1.2)
    elif kind == "mottled":
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1, 6) * size / 64)
        base = base * np.clip(0.7 + 0.3 * field[..., None] / (field.std() + 1e-8), 0, 1.3)
    return np.clip(base, 0, 255)


def add_clutter(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    """Uncaptioned detail: thin lines and curves, dots and faint blobs, as real photographs have.

    Captions never describe everything; this detail is what teaches the autoencoder to keep thin
    structures and small spots (a radiograph's pleural line, a catheter, a nodule).
    """
    for _ in range(rng.integers(2, 7)):
        shade = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        points = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(rng.integers(2, 5))]
        if kind == 0:
            draw.line(points, fill=shade, width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(0.5, 2.5) * size / 64
            x, y = points[0]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=shade)
        else:
            x, y = points[0]
            rx, ry = rng.uniform(0.05, 0.2, 2) * size
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), outline=shade, width=1)


def render_scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One captioned scene (RGB image, caption), fully determined by `rng`."""
    names = list(COLOURS)
    bg_kind, bg_colour = str(rng.choice(BACKGROUNDS)), str(rng.choice(names))
    image = Image.fromarray(background(bg_kind, COLOURS[bg_colour], size, rng).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    add_clutter(draw, size, rng)
    parts = []
    positions = rng.permutation(list(POSITIONS))[: rng.integers(1, 3)]
    for position in positions:
        shape, size_name = str(rng.choice(SHAPES)), str(rng.choice(list(SIZES)))
        colour = str(rng.choice([n for n in names if n != bg_colour]))
        cx, cy = POSITIONS[str(position)]
        draw_shape(draw, shape, (cx * size, cy * size), SIZES[size_name] * size, COLOURS[colour])
        parts.append(f"a {size_name} {colour} {shape} {position}")
    background_words = "" if bg_kind == "plain" else f"{bg_kind} "
    caption = f"{' and '.join(parts)}, on a {background_words}{bg_colour} background"
    style = rng.random()
    if style < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(radius=size / 40))
        caption = f"a blurry photo of {caption}"
    elif style < 0.5:
        image = image.convert("L").convert("RGB")
        caption = f"a black and white photo of {caption}"
    return image, caption
