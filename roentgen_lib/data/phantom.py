"""The phantom world: frontal chest radiographs rendered from report labels and real lung masks.

`render(labels, mask, rng, size)` draws a body (soft tissue, spine, ribs, clavicles, mediastinum,
heart, diaphragm), air-filled lungs with vessel markings, then every finding the labels call for,
with its side and severity, and returns the image (uint8, 0-255) plus what was actually drawn.
Display convention as on a PA radiograph: the patient's right is on the viewer's left.

Labels come from `roentgen_lib.text.labels.label_report`. Positive findings are drawn; uncertain
ones with probability UNCERTAIN_DRAW_PROBABILITY, as a hedged report is right only sometimes;
a missing side or severity is drawn at random. The result records the truth either way.
Everything random comes from `rng`, so an image is fully determined by its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from roentgen_lib.data.masks import LEFT_LUNG, RIGHT_LUNG
from roentgen_lib.text.labels import device_kinds, label_report

UNCERTAIN_DRAW_PROBABILITY = 0.5
SEVERITIES = ("small", "moderate", "large")
SEVERITY_WEIGHTS = (0.45, 0.4, 0.15)
# Cardiothoracic ratio ranges; normal hearts stay below 0.5, the radiological threshold.
CTR_RANGE = {None: (0.40, 0.48), "small": (0.53, 0.57), "moderate": (0.58, 0.62), "large": (0.65, 0.70)}
EFFUSION_HEIGHT = {"small": (0.10, 0.16), "moderate": (0.28, 0.38), "large": (0.5, 0.65)}
PNEUMOTHORAX_RIM = {"small": (0.12, 0.18), "moderate": (0.25, 0.33), "large": (0.42, 0.52)}
OPACITY_STRENGTH = {"small": 0.5, "moderate": 0.7, "large": 0.85}  # share of aeration lost
EDEMA_STRENGTH = {"small": 0.08, "moderate": 0.14, "large": 0.22}
ZONES = ("upper", "middle", "lower")
LATERAL_FINDINGS = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Pneumonia", "Lung Opacity",
                    "Atelectasis", "Lung Lesion", "Fracture", "Pleural Other", "Support Devices")
DEVICE_KINDS = ("pacemaker", "tube", "chest_tube", "line")


@dataclass
class Scene:
    """The image being drawn on, in one shared coordinate frame (x, y in [0, 1], y downwards)."""

    lungs: np.ndarray  # float, 1 inside the (aerated) lungs
    tissue: np.ndarray  # attenuation added by soft tissue, bone, fluid and devices
    markings: np.ndarray  # vessel texture, visible only where lung is aerated
    side_masks: dict[str, np.ndarray]  # "right"/"left" lung masks (patient sides)
    xx: np.ndarray
    yy: np.ndarray
    drawn: dict[str, dict] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.lungs.shape[0]


def lung_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """x0, x1, y0, y1 of a mask in frame units."""
    rows, cols = np.nonzero(mask)
    n = mask.shape[0]
    return cols.min() / n, (cols.max() + 1) / n, rows.min() / n, (rows.max() + 1) / n


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered noise with correlation length sigma (pixels)."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (noise - noise.mean()) / (noise.std() + 1e-8)


def blob(scene: Scene, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """A soft elliptical blob centred at (cx, cy) with radii (rx, ry), peak 1."""
    return np.exp(-(((scene.xx - cx) / rx) ** 2 + ((scene.yy - cy) / ry) ** 2))


def new_scene(mask: np.ndarray, rng: np.random.Generator) -> Scene:
    """Body, bones and aerated lungs with vessel markings, before any finding."""
    size = mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    side_masks = {"right": (mask == RIGHT_LUNG).astype(float), "left": (mask == LEFT_LUNG).astype(float)}
    lungs = ndimage.gaussian_filter(side_masks["right"] + side_masks["left"], size / 160)
    hilum_distance = np.minimum(np.hypot(xx - 0.38, yy - 0.45), np.hypot(xx - 0.62, yy - 0.45))
    ridges = np.abs(smooth_noise(rng, size, size / 90))
    vessels = np.clip(0.9 - ridges, 0, None) * np.exp(-hilum_distance / 0.22)
    scene = Scene(lungs=lungs, tissue=body_tissue(xx, yy, rng), markings=0.16 * vessels,
                  side_masks=side_masks, xx=xx, yy=yy)
    add_bones(scene, rng)
    return scene


def body_tissue(xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft-tissue attenuation: a torso with shoulders, brighter abdomen below the diaphragm."""
    half_width = rng.uniform(0.44, 0.49)
    torso = 1 / (1 + np.exp((np.abs(xx - 0.5) - half_width) / 0.015))
    shoulders = 1 / (1 + np.exp((0.06 + 0.25 * np.abs(xx - 0.5) ** 2 - yy) / 0.02))
    abdomen = 1 / (1 + np.exp((0.78 - yy) / 0.03))
    return rng.uniform(0.35, 0.45) * torso * shoulders + 0.15 * abdomen * torso


def add_bones(scene: Scene, rng: np.random.Generator) -> None:
    """Spine with vertebrae, posterior ribs as arcs on both sides, and the clavicles."""
    xx, yy = scene.xx, scene.yy
    spine = np.exp(-(((xx - 0.5) / 0.035) ** 4)) * (0.85 + 0.15 * np.cos(yy * 2 * np.pi * 16))
    scene.tissue += 0.18 * spine
    thorax = (yy > 0.08) * (yy < 0.84)
    spacing = rng.uniform(0.070, 0.080)
    # Per side, only the pixels a rib can cover: the arcs are evaluated there alone. The arc's three
    # terms are added to y0 one by one, not folded into one offset, so every sum rounds as it always
    # did and the images (and dataset fingerprints) stay bit-identical.
    sides = []
    for sign in (-1, 1):
        dx = np.clip(sign * (xx - 0.5), 0, None)
        inside = (dx > 0.03) & (dx < 0.44) & thorax
        d = dx[inside]
        sides.append((inside, yy[inside], 0.35 * d**1.5, 0.2 * d**2, 0.25 * d))
    for k in range(10):
        y0 = 0.12 + k * spacing
        for inside, y, rise, fall, slope in sides:
            rib_y = y0 + rise - fall + slope
            scene.tissue[inside] += 0.05 * np.exp(-(((y - rib_y) / 0.011) ** 2))
    for sign in (-1, 1):
        dx = sign * (xx - 0.5)
        clavicle = np.exp(-(((yy - (0.13 - 0.06 * dx)) / 0.014) ** 2)) * (dx > 0.05) * (dx < 0.33)
        scene.tissue += 0.12 * clavicle


def add_heart(scene: Scene, ctr: float, rng: np.random.Generator) -> None:
    """Mediastinum and a heart whose width is `ctr` times the thoracic width (cardiothoracic ratio)."""
    x0, x1, _, y1 = lung_box(scene.side_masks["right"] + scene.side_masks["left"])
    width = ctr * (x1 - x0)
    cx = 0.5 + 0.12 * width + rng.uniform(-0.01, 0.01)  # the heart sits more to the patient's left
    cy = y1 - 0.15
    radius = np.hypot((scene.xx - cx) / (width / 2), (scene.yy - cy) / (0.13 + 0.15 * (ctr - 0.45)))
    heart = 1 / (1 + np.exp((radius - 1) / 0.04)) * (scene.yy < y1 + 0.03)
    mediastinum = np.exp(-(((scene.xx - 0.5) / 0.07) ** 4)) * (scene.yy > 0.05) * (scene.yy < cy)
    shadow = np.maximum(heart, 0.8 * mediastinum)
    scene.tissue += 0.12 * shadow
    scene.lungs *= 1 - shadow


def sides_of(side: str) -> tuple[str, ...]:
    """Patient sides a finding covers."""
    return ("right", "left") if side == "bilateral" else (side,)


def add_effusion(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """Pleural fluid filling the lung base up to a meniscus that rises laterally."""
    for side in sides_of(attrs["side"]):
        mask = scene.side_masks[side]
        x0, x1, y0, y1 = lung_box(mask)
        height = rng.uniform(*EFFUSION_HEIGHT[attrs["severity"]]) * (y1 - y0)
        lateral = np.clip((scene.xx - x1) / (x0 - x1) if side == "right" else (scene.xx - x0) / (x1 - x0), 0, 1)
        top = y1 - height - 0.05 * lateral**2 * (0.5 + height / (y1 - y0))
        region = ndimage.gaussian_filter(ndimage.binary_dilation(mask > 0, iterations=2).astype(float), 1)
        fluid = region / (1 + np.exp((top - scene.yy) / 0.008))
        scene.lungs *= 1 - 0.9 * fluid
        scene.tissue += 0.12 * fluid


def add_pneumothorax(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """A rim of free air without vessel markings, bounded by the collapsed lung's pleural line."""
    for side in sides_of(attrs["side"]):
        mask = scene.side_masks[side]
        x0, x1, y0, y1 = lung_box(mask)
        rim = rng.uniform(*PNEUMOTHORAX_RIM[attrs["severity"]])
        n = scene.size
        hilum = np.array([(y0 + 0.55 * (y1 - y0)) * n, (x1 if side == "right" else x0) * n])
        scale = 1 / (1 - rim)
        collapsed = ndimage.affine_transform(mask, [scale, scale], offset=hilum - scale * hilum, order=1)
        free_air = np.clip(mask - collapsed, 0, 1)
        edge = np.hypot(*np.gradient(ndimage.gaussian_filter(collapsed, n / 256)))
        edge *= ndimage.binary_dilation(free_air > 0.5, iterations=max(1, n // 64))
        scene.markings *= 1 - ndimage.gaussian_filter(free_air, n / 256)
        scene.lungs += 0.5 * free_air
        scene.tissue += 0.7 * n / 128 * edge


def add_opacity(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """Patchy airspace opacity in the named lung zone (consolidation, pneumonia, lung opacity)."""
    radius = {"small": 0.07, "moderate": 0.1, "large": 0.14}[attrs["severity"]]
    for side in sides_of(attrs["side"]):
        mask = scene.side_masks[side]
        x0, x1, y0, y1 = lung_box(mask)
        zone_centre = {"upper": 0.22, "middle": 0.5, "lower": 0.75}[attrs["zone"]]
        cx = x0 + rng.uniform(0.35, 0.65) * (x1 - x0)
        cy = y0 + zone_centre * (y1 - y0) + rng.uniform(-0.04, 0.04)
        patches = np.clip(0.65 + 0.5 * smooth_noise(rng, scene.size, scene.size / 40), 0, 1)
        opacity = blob(scene, cx, cy, radius, radius * 1.2) * patches * mask
        scene.tissue += 0.15 * opacity
        scene.lungs *= 1 - OPACITY_STRENGTH[attrs["severity"]] * opacity
        scene.markings *= 1 - 0.7 * opacity


def add_atelectasis(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """Plate-like (linear) atelectasis: a thin, slightly tilted band in the lung base."""
    for side in sides_of(attrs["side"]):
        mask = scene.side_masks[side]
        x0, x1, y0, y1 = lung_box(mask)
        yb = y0 + rng.uniform(0.62, 0.8) * (y1 - y0) + rng.uniform(-0.03, 0.03) * (scene.xx - x0)
        thickness = {"small": 0.008, "moderate": 0.013, "large": 0.02}[attrs["severity"]]
        scene.tissue += 0.18 * np.exp(-(((scene.yy - yb) / thickness) ** 2)) * mask


def add_nodule(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """A round, sharply marginated nodule or mass."""
    radius = {"small": 0.018, "moderate": 0.03, "large": 0.05}[attrs["severity"]]
    side = sides_of(attrs["side"])[0]
    x0, x1, y0, y1 = lung_box(scene.side_masks[side])
    cx, cy = x0 + rng.uniform(0.3, 0.7) * (x1 - x0), y0 + rng.uniform(0.2, 0.7) * (y1 - y0)
    distance = np.hypot(scene.xx - cx, scene.yy - cy)
    scene.tissue += 0.2 / (1 + np.exp((distance - radius) / 0.004))


def add_edema(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """Bilateral perihilar (bat-wing) haze with prominent interstitial markings."""
    strength = EDEMA_STRENGTH[attrs["severity"]]
    haze = blob(scene, 0.37, 0.47, 0.13, 0.2) + blob(scene, 0.63, 0.47, 0.13, 0.2)
    patches = 0.8 + 0.2 * smooth_noise(rng, scene.size, scene.size / 30)
    scene.lungs *= 1 - 2.5 * strength * np.clip(haze, 0, 1) * patches
    scene.markings *= 1 + 4 * strength


def add_mediastinal_widening(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """A widened upper mediastinum."""
    half_width = {"small": 0.09, "moderate": 0.11, "large": 0.14}[attrs["severity"]]
    band = np.exp(-(((scene.xx - 0.5) / half_width) ** 6)) * np.exp(-(((scene.yy - 0.3) / 0.16) ** 4))
    scene.tissue += 0.15 * band
    scene.lungs *= 1 - 0.8 * band


def add_pleural_thickening(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """An apical pleural cap: a thin dense rim at the lung apex."""
    for side in sides_of(attrs["side"]):
        mask = scene.side_masks[side]
        _, _, y0, y1 = lung_box(mask)
        rim = mask - ndimage.binary_erosion(mask > 0, iterations=max(1, scene.size // 60))
        scene.tissue += 0.25 * ndimage.gaussian_filter(rim * (scene.yy < y0 + 0.2 * (y1 - y0)), 1)


def add_fracture(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """A rib fracture: a lucent gap with a step across one lateral rib."""
    side = sides_of(attrs["side"])[0]
    x0, x1, y0, y1 = lung_box(scene.side_masks[side])
    cx = x0 + (0.12 if side == "right" else 0.88) * (x1 - x0)
    cy = y0 + rng.uniform(0.3, 0.6) * (y1 - y0)
    scene.tissue -= 0.08 * blob(scene, cx, cy, 0.008, 0.03)
    scene.tissue += 0.08 * blob(scene, cx + 0.012, cy + 0.012, 0.008, 0.012)


def draw_curve(scene: Scene, points: list[tuple[float, float]], width: float) -> np.ndarray:
    """A smooth thin curve through control points (quadratic Bezier pieces), peak ~1."""
    canvas = np.zeros_like(scene.xx)
    pts = np.array(points)
    for t in np.linspace(0, 1, 400):
        # a de Casteljau walk through all control points
        p = pts.copy()
        while len(p) > 1:
            p = (1 - t) * p[:-1] + t * p[1:]
        x, y = np.clip((p[0] * scene.size).astype(int), 0, scene.size - 1)
        canvas[y, x] = 1
    blurred = ndimage.gaussian_filter(canvas, width * scene.size)
    return blurred / (blurred.max() + 1e-8)


def add_devices(scene: Scene, attrs: dict, rng: np.random.Generator) -> None:
    """Support devices: pacemaker with leads, endotracheal tube, chest tube and central line.

    Chest tubes and lines go on the named side (the patient's right is the image's left);
    pacemakers sit, as usual, below the patient's left clavicle.
    """
    mirror = (lambda x: x) if attrs["side"] != "left" else (lambda x: 1 - x)
    for kind in attrs["kinds"]:
        if kind == "pacemaker":
            generator = blob(scene, 0.74, 0.17, 0.045, 0.03) > 0.37
            scene.tissue += 0.5 * ndimage.gaussian_filter(generator.astype(float), 0.7)
            scene.tissue += 0.35 * draw_curve(scene, [(0.72, 0.18), (0.55, 0.22), (0.47, 0.45), (0.52, 0.62)], 0.004)
        elif kind == "tube":
            scene.tissue += 0.45 * draw_curve(scene, [(0.49, 0.0), (0.5, 0.15), (0.5, 0.3)], 0.008)
        elif kind == "chest_tube":
            points = [(0.2, 0.75), (0.2, 0.35), (0.32, 0.2)]
            scene.tissue += 0.3 * draw_curve(scene, [(mirror(x), y) for x, y in points], 0.006)
        else:
            points = [(0.2, 0.1), (0.38, 0.14), (0.46, 0.2), (0.47, 0.33)]
            scene.tissue += 0.3 * draw_curve(scene, [(mirror(x), y) for x, y in points], 0.004)


DRAWERS = {
    "Enlarged Cardiomediastinum": add_mediastinal_widening,
    "Lung Opacity": add_opacity,
    "Lung Lesion": add_nodule,
    "Edema": add_edema,
    "Consolidation": add_opacity,
    "Pneumonia": add_opacity,
    "Atelectasis": add_atelectasis,
    "Pneumothorax": add_pneumothorax,
    "Pleural Effusion": add_effusion,
    "Pleural Other": add_pleural_thickening,
    "Fracture": add_fracture,
    "Support Devices": add_devices,
}


def random_side(finding: str, rng: np.random.Generator) -> str:
    """A side for a finding whose report does not give one (effusions are often bilateral)."""
    if finding == "Pleural Effusion":
        return str(rng.choice(["right", "left", "bilateral"], p=[0.35, 0.3, 0.35]))
    return str(rng.choice(["right", "left"]))


def plan_findings(labels: dict[str, dict], rng: np.random.Generator,
                  device_kinds: tuple[str, ...] = ()) -> dict[str, dict]:
    """Decide what to draw: which findings, on which side, how severe, in which zone."""
    plan: dict[str, dict] = {}
    for finding, label in labels.items():
        if finding not in DRAWERS and finding != "Cardiomegaly":
            continue
        if label["status"] == "negative":
            continue
        if label["status"] == "uncertain" and rng.random() >= UNCERTAIN_DRAW_PROBABILITY:
            continue
        attrs: dict = {}
        if finding not in ("Support Devices", "Fracture"):
            attrs["severity"] = label.get("severity") or str(rng.choice(SEVERITIES, p=SEVERITY_WEIGHTS))
        if finding in LATERAL_FINDINGS:
            attrs["side"] = label.get("laterality") or random_side(finding, rng)
        if finding in ("Consolidation", "Pneumonia", "Lung Opacity"):
            attrs["zone"] = label.get("zone") or str(rng.choice(ZONES, p=[0.2, 0.3, 0.5]))
        if finding == "Support Devices":
            attrs["kinds"] = list(device_kinds) or [str(rng.choice(DEVICE_KINDS))]
        plan[finding] = attrs
    return plan


def expose(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Turn attenuation into a radiograph: contrast, gamma, mottle and quantum noise, in [0, 1]."""
    lungs = np.clip(scene.lungs, 0, None)
    image = scene.tissue + 0.18 - 0.3 * lungs + scene.markings * np.clip(lungs, 0, 1)
    image = ndimage.gaussian_filter(image, scene.size / 300)
    image = image * rng.uniform(1.0, 1.25) + rng.uniform(-0.05, 0.05)
    image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.2)
    image += 0.02 * smooth_noise(rng, scene.size, scene.size / 64) + rng.uniform(0.01, 0.03) * rng.standard_normal(image.shape)
    return np.clip(image, 0, 1)


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a square image by an integer factor to `size` (anti-aliased)."""
    factor = image.shape[0] // size
    return image[: size * factor, : size * factor].reshape(size, factor, size, factor).mean(axis=(1, 3))


def render_size(size: int) -> int:
    """Internal rendering resolution: at least 128 px, an integer multiple of `size`."""
    return size * max(1, -(-128 // size))


def render(labels: dict[str, dict], mask: np.ndarray, rng: np.random.Generator, size: int,
           device_kinds: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, dict]]:
    """Render one radiograph (uint8, size x size) and the findings drawn, from report labels.

    `mask` is a lung mask from `masks.load_lung_masks(render_size(size))`.
    """
    plan = plan_findings(labels, rng, device_kinds)
    severity = plan.get("Cardiomegaly", {}).get("severity")
    ctr = float(rng.uniform(*CTR_RANGE[severity]))
    scene = new_scene(mask, rng)
    add_heart(scene, ctr, rng)
    for finding, attrs in plan.items():
        if finding in DRAWERS:
            DRAWERS[finding](scene, attrs, rng)
    image = downsample(expose(scene, rng), size)
    plan["_ctr"] = {"value": round(ctr, 4)}
    return np.round(image * 255).astype(np.uint8), plan


GALLERY_PROMPTS = (
    "No acute cardiopulmonary process.",
    "Moderate cardiomegaly.",
    "Large right pleural effusion.",
    "Small left pleural effusion.",
    "Large left pneumothorax.",
    "Small right apical pneumothorax.",
    "Right lower lobe consolidation.",
    "Left upper lobe pneumonia.",
    "Moderate pulmonary edema.",
    "Left basilar atelectasis.",
    "Right upper lobe nodule.",
    "Pacemaker in place.",
    "Right PICC line.",
    "Endotracheal tube in place.",
    "Left chest tube.",
    "Right rib fracture.",
)


def render_gallery(prompts: tuple[str, ...], masks: np.ndarray, size: int, seed: int) -> list[tuple[np.ndarray, dict]]:
    """One patient (same lung mask, same seed) rendered once per prompt: differences are the findings."""
    mask = masks[np.random.default_rng(seed).integers(len(masks))]
    return [render(label_report(p), mask, np.random.default_rng([seed, 0]), size, tuple(device_kinds(p)))
            for p in prompts]


def render_prompts(prompts: list[str], masks: np.ndarray, size: int, seed: int) -> list[tuple[np.ndarray, dict]]:
    """A phantom radiograph for each prompt, image k from its own patient (lung mask) and seed (seed, 9, k).

    The phantom world's "real" images for any text, e.g. prompts the dataset has too few of: 05 uses
    them as a balanced held-out reference for the prompts the models were asked to draw.
    """
    out = []
    for k, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, 9, k])
        out.append(render(label_report(prompt), masks[rng.integers(len(masks))], rng, size, tuple(device_kinds(prompt))))
    return out
