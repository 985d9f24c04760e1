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

Tables are tidy: one row per model x prompt set x finding x metric. Also here: fidelity (FID with
three feature extractors), diversity (MS-SSIM), the memorization audit, the text-encoder probe and
the downstream classifier. How 05 applies them to a profile's models is in `experiments`.

Usage::

    truth = truth_table(real["train"])
    net = train_classifier(images_array(real["train"], cfg.image_size), truth, seed=0)
    alignment_table(predict(net, images_array(synthetic, size)), truth_table(synthetic), model="both")
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from roentgen_lib.models import PICKLE_SUFFIXES, compute_device, reconstruct
from roentgen_lib.parallel import run_jobs
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
    return pd.DataFrame(rows, columns=[*FINDINGS, *(f"{f} {h}" for f in LATERAL for h in ("side", "size"))])


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


# ---------------------------------------------------------------- fidelity (FID with three feature extractors)

class ClassifierFeatures(nn.Module):
    """The pooled features of our own FindingNet, as the feature extractor FID calls: always available offline."""

    def __init__(self, net: FindingNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.feature_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W)
        return self.net.body(images.float().mean(dim=1, keepdim=True) / 127.5 - 1.0)


class XrvFeatures(nn.Module):
    """torchxrayvision's DenseNet-121 (all-datasets model) pooled features: the chest-X-ray "FID-XRV".

    The weights must be a local safetensors file of `xrv.models.DenseNet` (torchxrayvision itself
    downloads pickles, which this project never loads); images are resized to 224 px and scaled
    to the [-1024, 1024] range the model was trained on.
    """

    num_features = 1024

    def __init__(self, weights: Path) -> None:
        super().__init__()
        import torchxrayvision as xrv
        from safetensors.torch import load_file

        self.model = xrv.models.DenseNet(weights=None)
        state = load_file(str(weights))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "op_threshs"]:
            raise ValueError(f"{weights} does not hold torchxrayvision DenseNet-121 weights "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.float().mean(dim=1, keepdim=True) / 255.0 * 2048.0 - 1024.0
        return self.model.features2(nn.functional.interpolate(grey, size=224, mode="bilinear", align_corners=False))

    @torch.no_grad()
    def presence(self, images: np.ndarray) -> np.ndarray:
        """The DenseNet's score (logit) for each of `FINDINGS` in uint8 grey images, (N, len(FINDINGS))."""
        import torchxrayvision as xrv

        columns = [xrv.datasets.default_pathologies.index(XRV_PATHOLOGY.get(f, f)) for f in FINDINGS]
        device = net_device(self)
        scores = [self.model.classifier(self(batch.to(device)))[:, columns].cpu() for batch in rgb_batches(images, 64)]
        return torch.cat(scores).numpy() if scores else np.zeros((0, len(FINDINGS)), np.float32)


XRV_PATHOLOGY = {"Pleural Effusion": "Effusion"}  # findings torchxrayvision names otherwise
XRV_ALIGNMENT = "AUROC (XRV DenseNet)"


def pretrained_alignment_table(extractor: nn.Module | str, images: np.ndarray, truth: pd.DataFrame, **keys) -> pd.DataFrame:
    """AUROC per finding as torchxrayvision's pretrained DenseNet reads `images`, a second judge trained on
    real chest X-rays (MIMIC, CheXpert, NIH and more), or one row saying why it is unavailable."""
    if isinstance(extractor, str):
        return pd.DataFrame([{**keys, "metric": XRV_ALIGNMENT, "value": float("nan"), "note": extractor}])
    return alignment_table({"presence": extractor.presence(images)}, truth, metric=XRV_ALIGNMENT, **keys)


def unavailable_metrics(results: pd.DataFrame) -> pd.Series:
    """Each metric of a results table that could not be computed (weights absent, say), with the reason."""
    noted = results[results.get("note", pd.Series("", index=results.index)).fillna("").astype(bool)]
    return noted.drop_duplicates("metric").set_index("metric")["note"]


def inception_features(weights: Path) -> nn.Module:
    """FID's own Inception-v3 (torch-fidelity's port of the 2015 TensorFlow weights, as torchmetrics uses
    it) from a local safetensors file: its 2048 pooled features make FIDs comparable with published ones."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        state = load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file ({error})") from None
    with tempfile.TemporaryDirectory() as folder:
        # torch-fidelity builds the network only from a torch (pickle) file: it gets one this process
        # wrote from the safetensors tensors into a private folder; nothing pickled elsewhere is read
        path = Path(folder) / "inception.pt"
        torch.save(state, path)
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path))
        except RuntimeError as error:
            raise ValueError(f"{weights} does not hold torch-fidelity's Inception-v3 FID weights "
                             f"({str(error).splitlines()[0]})") from None


def weights_problem(path: str | Path | None, what: str, field: str) -> str | None:
    """Why the local weights file `path` cannot be used (absent, or a pickle), or None when it can."""
    if path is None or not Path(path).is_file():
        return f"no {what} weights at {path} (set {field} to a local safetensors file)"
    if Path(path).suffix in PICKLE_SUFFIXES:
        return f"{path} is a pickled file, never loaded here (unpickling can run code); convert it to safetensors where you trust it"
    return None


def feature_extractors(net: FindingNet, xrv_weights: str | Path | None,
                       inception_weights: str | Path | None = None) -> dict[str, nn.Module | str]:
    """FID feature extractors by name, on the judge's device, or the reason one is unavailable (never a
    stand-in number)."""
    inception = weights_problem(inception_weights, "Inception-v3 FID (torch-fidelity's weights-inception-2015-12-05)",
                                "inception_weights")
    xrv = weights_problem(xrv_weights, "torchxrayvision DenseNet", "xrv_weights")
    device = net_device(net)
    return {"Inception-v3": inception or inception_features(Path(inception_weights)).to(device),
            "XRV DenseNet": xrv or XrvFeatures(Path(xrv_weights)).to(device),
            "FindingNet (ours)": ClassifierFeatures(net)}


def rgb_batches(images: np.ndarray, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """uint8 (N, H, W) grey images as uint8 (B, 3, H, W) tensors, as FID extractors take them."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def frechet_distance(extractor: nn.Module, real: np.ndarray, synthetic: np.ndarray) -> float:
    """FID between two sets of uint8 grey images in the feature space of `extractor` (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = net_device(extractor)
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, input_img_size=(3, *real.shape[1:])).to(device)
    for images, is_real in ((real, True), (synthetic, False)):
        for batch in rgb_batches(images):
            metric.update(batch.to(device), real=is_real)
    return float(metric.compute())


def fid_table(extractors: dict[str, nn.Module | str], real: np.ndarray, synthetic: np.ndarray, **keys) -> pd.DataFrame:
    """One FID row per feature extractor; an unavailable extractor gives NaN and the reason."""
    rows = []
    for name, extractor in extractors.items():
        available = not isinstance(extractor, str)
        value = frechet_distance(extractor, real, synthetic) if available else float("nan")
        rows.append({**keys, "metric": f"FID ({name})", "value": float(f"{value:.4g}"), "real images": len(real),
                     "synthetic images": len(synthetic), "note": "" if available else extractor})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- diversity (MS-SSIM within groups)

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the standard five scales (Wang et al. 2003)


def ms_ssim_betas(side: int, kernel: int) -> tuple[float, ...]:
    """The scales an image of `side` pixels holds (each at least twice the kernel; 64 px: 3, 512 px: all 5),
    their weights renormalised to sum to 1."""
    scales = max(k for k in range(1, len(MS_SSIM_BETAS) + 1) if side / 2 ** (k - 1) >= 2 * kernel)
    return tuple(b / sum(MS_SSIM_BETAS[:scales]) for b in MS_SSIM_BETAS[:scales])


def mean_pairwise_ms_ssim(images: np.ndarray, max_pairs: int = 256, seed: int = 0) -> float:
    """Mean MS-SSIM over pairs of uint8 grey images (1: identical; lower: more diverse), on `compute_device()`.

    All pairs when there are at most `max_pairs`, else a seeded sample of `max_pairs` of them: a
    group of 800 real normals has 320,000 pairs, which ran the demo out of 24 GB of memory. Pairs are
    scored in chunks of 16 M pixels (all of the demo's at once; 64 pairs at 512 px).
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    first, second = np.triu_indices(len(images), k=1)
    if len(first) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(first), max_pairs, replace=False)
        first, second = first[chosen], second[chosen]
    device, chunk = compute_device(), max(1, 2**24 // images.shape[-1] ** 2)
    kernel = 7 if images.shape[-1] < 96 else 11
    betas = ms_ssim_betas(images.shape[-1], kernel)
    as_floats = lambda rows: (torch.from_numpy(images[rows]).float().unsqueeze(1) / 255.0).to(device)  # noqa: E731
    scores = [ms_ssim(as_floats(first[k : k + chunk]), as_floats(second[k : k + chunk]), data_range=1.0,
                      kernel_size=kernel, betas=betas, reduction="none").cpu() for k in range(0, len(first), chunk)]
    return float(torch.cat(scores).mean())


def diversity_table(images: np.ndarray, groups: list[str], seed: int = 0, **keys) -> pd.DataFrame:
    """Mean pairwise MS-SSIM within each group (same prompt, or same labels), averaged over groups.

    `seed` draws the pairs of a group too large to compare every pair (see `mean_pairwise_ms_ssim`).
    """
    frame = pd.DataFrame({"group": groups})
    values = [mean_pairwise_ms_ssim(images[idx.to_numpy()], seed=seed) for _, idx in frame.groupby("group").groups.items()
              if len(idx) > 1]
    return pd.DataFrame([{**keys, "metric": "MS-SSIM within group", "value": round(float(np.mean(values)), 4),
                          "groups": len(values)}])


# ---------------------------------------------------------------- memorization audit

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


# ---------------------------------------------------------------- text-encoder probe

@torch.no_grad()
def text_embeddings(text_encoder: nn.Module, tokenizer, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """Mean text-encoder state over each prompt's tokens (start to end-of-text), one row per prompt."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        states = text_encoder(tokens.input_ids.to(net_device(text_encoder)))[0].float().cpu()
        mask = tokens.attention_mask.unsqueeze(-1).to(states.dtype)
        rows.append(((states * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(rows)


def probe_table(train_embeddings: np.ndarray, train_truth: pd.DataFrame, test_embeddings: np.ndarray,
                test_truth: pd.DataFrame, seed: int, **keys) -> pd.DataFrame:
    """Linear probe (logistic regression) per finding on text embeddings: AUROC on held-out reports."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    for finding in FINDINGS:
        y_train, y_test = train_truth[finding].to_numpy(), test_truth[finding].to_numpy()
        usable = 0 < y_train.sum() < len(y_train) and 0 < y_test.sum() < len(y_test)
        value = float("nan")
        if usable:
            probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
            probe.fit(train_embeddings, y_train)
            value = roc_auc_score(y_test, probe.predict_proba(test_embeddings)[:, 1])
        rows.append({**keys, "finding": finding, "metric": "probe AUROC", "value": round(float(value), 4),
                     "test positives": int(y_test.sum())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- downstream augmentation

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
