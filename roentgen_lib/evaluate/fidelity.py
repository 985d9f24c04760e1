"""Fidelity and diversity: FID with three feature extractors (the judge's, torchxrayvision's DenseNet and
Inception-v3, each from local weights or reported unavailable) and MS-SSIM within prompt groups."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from roentgen_lib.evaluate.alignment import alignment_table
from roentgen_lib.evaluate.judge import FINDINGS, FindingNet, net_device
from roentgen_lib.models import PICKLE_SUFFIXES, compute_device


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
    """FID between two sets of uint8 grey images in the feature space of `extractor` (torchmetrics); NaN when a
    set holds fewer than two images, which have no covariance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(synthetic)) < 2:
        return float("nan")

    device = net_device(extractor)
    metric = FrechetInceptionDistance(feature=extractor, normalize=False, input_img_size=(3, *real.shape[1:])).to(device)
    for images, is_real in ((real, True), (synthetic, False)):
        for batch in rgb_batches(images):
            metric.update(batch.to(device), real=is_real)
    return float(metric.compute())


def fid_table(extractors: dict[str, nn.Module | str], real: np.ndarray, synthetic: np.ndarray, **keys) -> pd.DataFrame:
    """One FID row per feature extractor; an unavailable extractor, or fewer than two images in a set (no
    covariance), gives NaN and the reason."""
    rows = []
    too_few = "FID needs at least 2 images in each set" if min(len(real), len(synthetic)) < 2 else ""
    for name, extractor in extractors.items():
        problem = extractor if isinstance(extractor, str) else too_few
        value = float("nan") if isinstance(extractor, str) else frechet_distance(extractor, real, synthetic)
        rows.append({**keys, "metric": f"FID ({name})", "value": float(f"{value:.4g}"), "real images": len(real),
                     "synthetic images": len(synthetic), "note": problem})
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
