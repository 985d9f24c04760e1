"""Figures: one function per figure, returning a matplotlib Figure; `save_figure` writes PNG + PDF.

Figures are built on `matplotlib.figure.Figure` directly (not pyplot), so a notebook shows exactly
the figure a cell returns and nothing accumulates in pyplot's global state. Every saved figure gets
a JSON sidecar naming the run that made it (config, dataset fingerprint, git commit).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from roentgen_lib.config import Config
from roentgen_lib.files import write_json_atomic
from roentgen_lib.provenance import git_state, package_versions
from roentgen_lib.text.labels import OBSERVATIONS
from roentgen_lib.text.tokenizer import CONTEXT_LENGTH

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig: Figure, name: str, cfg: Config, inputs: dict | None = None) -> Figure:
    """Write `fig` as <figures>/<name>.png and .pdf plus a <name>.json sidecar; return the figure."""
    out = cfg.figures_path
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    write_json_atomic(out / f"{name}.json", {"figure": name, "config": cfg.to_dict(), "inputs": inputs or {},
                                             "git": git_state(), "packages": package_versions()})
    return fig


def _describe_drawn(drawn: dict) -> str:
    """A short caption of what the renderer drew, e.g. "Pleural Effusion R large"."""
    parts = []
    for finding, attrs in drawn.items():
        if finding.startswith("_"):
            continue
        side = {"right": "R", "left": "L", "bilateral": "bilat"}.get(attrs.get("side"), "")
        parts.append(" ".join(p for p in (finding, side, attrs.get("severity", "")) if p))
    return "\n".join(parts) or "no finding"


def fig_phantom_gallery(prompts: tuple[str, ...], rendered: list[tuple[np.ndarray, dict]], columns: int = 4) -> Figure:
    """One patient rendered once per prompt, each titled with its prompt and what was drawn."""
    rows = -(-len(prompts) // columns)
    fig = Figure(figsize=(3.2 * columns, 3.6 * rows))
    for k, (prompt, (image, drawn)) in enumerate(zip(prompts, rendered)):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{prompt}\n[{_describe_drawn(drawn)}, CTR {drawn['_ctr']['value']:.2f}]", fontsize=8)
        ax.axis("off")
    fig.suptitle("Phantom world: one patient, one finding at a time (patient's right on the viewer's left)")
    fig.tight_layout()
    return fig


def fig_dataset_samples(split, n: int = 8, columns: int = 4) -> Figure:
    """The first `n` images of a dataset split with their prompts (wrapped)."""
    import textwrap

    rows = -(-n // columns)
    fig = Figure(figsize=(3.2 * columns, 3.8 * rows))
    for k in range(min(n, len(split))):
        item = split[k]
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(np.asarray(item["image"]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(textwrap.shorten(item["prompt"], 90), fontsize=7, wrap=True)
        ax.axis("off")
    fig.tight_layout()
    return fig


def label_prevalence(split) -> pd.DataFrame:
    """Counts of positive / uncertain / negative mentions per observation in a dataset split."""
    frame = split.select_columns(list(OBSERVATIONS)).to_pandas()
    counts = {status: (frame == value).sum() for status, value in
              (("positive", 1.0), ("uncertain", -1.0), ("negative", 0.0))}
    return pd.DataFrame(counts).rename_axis("observation")


def fig_label_prevalence(prevalence: pd.DataFrame) -> Figure:
    """Stacked horizontal bars of mention status per observation."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    left = np.zeros(len(prevalence))
    palette = {"positive": "#c0392b", "uncertain": "#f39c12", "negative": "#7f8c8d"}
    for status in ("positive", "uncertain", "negative"):
        ax.barh(prevalence.index, prevalence[status], left=left, label=status, color=palette[status])
        left += prevalence[status].to_numpy()
    ax.invert_yaxis()
    ax.set_xlabel("reports in the training split")
    ax.legend(loc="lower right")
    ax.set_title("Label prevalence (rule labeler on the prompts)")
    fig.tight_layout()
    return fig


def fig_token_lengths(lengths: np.ndarray) -> Figure:
    """Histogram of CLIP token counts per prompt against the 77-token context."""
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    sns.histplot(lengths, bins=40, ax=ax, color="#2c3e50")
    ax.axvline(CONTEXT_LENGTH, color="#c0392b", linestyle="--", label=f"{CONTEXT_LENGTH}-token limit")
    ax.set_xlabel("CLIP tokens per prompt (with start/end markers)")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    return fig


def fig_labeler_agreement(f1: pd.DataFrame, target: float = 0.85) -> Figure:
    """Precision, recall and F1 per observation against the IU MeSH tags, with the target line."""
    tidy = f1.reset_index().melt(id_vars="observation", value_vars=["precision", "recall", "f1"],
                                 var_name="metric", value_name="value")
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    sns.barplot(tidy, y="observation", x="value", hue="metric", ax=ax)
    ax.axvline(target, color="#c0392b", linestyle="--", label=f"target F1 {target}")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("Rule labeler vs IU-Xray MeSH tags")
    fig.tight_layout()
    return fig
