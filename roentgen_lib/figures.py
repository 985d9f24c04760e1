"""Figures: one function per figure, returning a matplotlib Figure; `save_figure` writes PNG + PDF.

Figures are built on `matplotlib.figure.Figure` directly (not pyplot), so a notebook shows exactly
the figure a cell returns and nothing accumulates in pyplot's global state. Every saved figure gets
a JSON sidecar naming the run that made it (config, dataset fingerprint, git commit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from roentgen_lib.config import Config
from roentgen_lib.files import write_file_atomic, write_json_atomic
from roentgen_lib.provenance import git_state, package_versions
from roentgen_lib.text.labels import OBSERVATIONS
from roentgen_lib.text.tokenizer import CONTEXT_LENGTH

sns.set_theme(style="whitegrid", context="notebook")


def show_tables_unwrapped() -> None:
    """Print a wide table's plain text one line per row instead of in blocks of columns.

    Where a table wraps depends on how wide its numbers print, which differs between CPUs, and nbval
    compares that text (README, Testing); Jupyter shows the HTML table either way.
    """
    pd.set_option("display.expand_frame_repr", False)


def save_figure(fig: Figure, name: str, cfg: Config, inputs: dict | None = None) -> Figure:
    """Write `fig` as <figures>/<name>.png and .pdf plus a <name>.json sidecar; return the figure."""
    out = cfg.figures_path
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / f"{name}.png", lambda path: fig.savefig(path, format="png", dpi=150, bbox_inches="tight"))
    write_file_atomic(out / f"{name}.pdf", lambda path: fig.savefig(path, format="pdf", bbox_inches="tight",
                                                                    metadata={"CreationDate": None}))
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


def read_log(path: Path) -> pd.DataFrame:
    """A training log (tidy CSV: step, split, metric, value)."""
    return pd.read_csv(path)


def fig_training_curves(logs: dict[str, pd.DataFrame], smooth: int = 10) -> Figure:
    """Training loss (moving average) and validation loss per run, and the learning rate."""
    fig = Figure(figsize=(11, 3.8))
    loss_ax, lr_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for (name, log), colour in zip(logs.items(), sns.color_palette(n_colors=len(logs))):
        train = log[(log.split == "train") & (log.metric == "loss")]
        loss_ax.plot(train.step, train.value.rolling(smooth, min_periods=1).mean(), color=colour, label=f"{name} train")
        val = log[(log.split == "validation") & (log.metric == "loss")]
        loss_ax.plot(val.step, val.value, "o--", color=colour, label=f"{name} validation")
        lr = log[(log.split == "train") & (log.metric == "lr")]
        lr_ax.plot(lr.step, lr.value, color=colour, label=name)
    loss_ax.set(xlabel="step", ylabel="denoising loss (MSE)", title="Loss")
    lr_ax.set(xlabel="step", ylabel="learning rate", title="Schedule")
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def show_image(ax, image: np.ndarray) -> None:
    """An image panel without ticks: colour as it is, grey images in grey (0-255)."""
    ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_image_rows(rows: dict[str, np.ndarray], prompts: list[str]) -> Figure:
    """A grid: one row per model (label on the left), one column per prompt (title on top).

    Colour images are shown as they are (the base's tint is part of the result); grey ones in grey. No rows:
    a small figure that says there is nothing to show.
    """
    import textwrap

    if not rows:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no images to show (see the warning above)", ha="center", va="center")
        return fig
    fig = Figure(figsize=(2.4 * len(prompts), 2.6 * len(rows)))
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = fig.add_subplot(len(rows), len(prompts), r * len(prompts) + c + 1)
            show_image(ax, image)
            if r == 0:
                ax.set_title(textwrap.fill(prompts[c], 24), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.tight_layout()
    return fig


def fig_spec_grid(specs: list[dict], images: np.ndarray) -> Figure:
    """Controllability at a glance: one row per finding and side, one column per severity."""
    severities = list(dict.fromkeys(spec["severity"] for spec in specs))
    rows = list(dict.fromkeys((spec["finding"], spec["side"]) for spec in specs))
    fig = Figure(figsize=(1.9 * len(severities) + 1.2, 1.9 * len(rows)))
    for spec, image in zip(specs, images):
        r, c = rows.index((spec["finding"], spec["side"])), severities.index(spec["severity"])
        ax = fig.add_subplot(len(rows), len(severities), r * len(severities) + c + 1)
        show_image(ax, image)
        if r == 0:
            ax.set_title(spec["severity"], fontsize=9)
        if c == 0:
            ax.set_ylabel(f"{spec['finding']}\n{spec['side'] or ''}".strip(), fontsize=8)
    fig.suptitle("Requested finding x side x severity (patient's right on the viewer's left)", fontsize=10)
    fig.tight_layout()
    return fig


def fig_validation_progress(run_dir: Path) -> Figure:
    """The validation grids a run saved, one row per validation step."""
    paths = sorted((run_dir / "validation").glob("step-*.png"))
    fig = Figure(figsize=(10, 1.6 * max(len(paths), 1)))
    for k, path in enumerate(paths):
        ax = fig.add_subplot(len(paths), 1, k + 1)
        ax.imshow(np.asarray(Image.open(path)))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"step {int(path.stem.split('-')[1])}", fontsize=8)
    fig.tight_layout()
    return fig


def loss_summary(results: dict) -> pd.DataFrame:
    """Per run: steps and final training / validation loss (deterministic on CPU)."""
    rows = {}
    for name, result in results.items():
        log = read_log(result.log)
        last = {split: log[(log.split == split) & (log.metric == "loss")].value.iloc[-1] for split in ("train", "validation")}
        rows[name] = {"steps": result.steps, "final train loss": round(last["train"], 4),
                      "final validation loss": round(last["validation"], 4)}
    return pd.DataFrame(rows).T


def timing_summary(results: dict) -> pd.DataFrame:
    """Per run: seconds per step, images per second and peak memory (these vary between runs)."""
    return pd.DataFrame({name: {"s/step": round(r.seconds_per_step, 3), "images/s": round(r.images_per_second, 1),
                                "peak memory (MB)": round(r.peak_memory_mb)} for name, r in results.items()}).T


def fig_metric_bars(rows: pd.DataFrame, x: str, hue: str, ylabel: str, title: str = "",
                    target: float | None = None) -> Figure:
    """Bars of the `value` of tidy result rows: the mean and, over several seeds, the standard deviation.

    Rows with one value per bar and a `ci low` / `ci high` interval (a share's Wilson interval) show
    that interval instead: a single run's share of a few dozen images is known only that well.
    """
    rows = rows.dropna(subset=["value"])
    fig = Figure(figsize=(max(6.0, 1.4 * rows[x].nunique() + 2), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    order, hue_order = list(rows[x].unique()), list(rows[hue].unique())
    intervals = {"ci low", "ci high"} <= set(rows.columns) and not rows.duplicated([x, hue]).any()
    sns.barplot(data=rows, x=x, y="value", hue=hue, order=order, hue_order=hue_order,
                errorbar=None if intervals else "sd", ax=ax)
    if intervals:
        draw_intervals(ax, rows, x, hue, order, hue_order)
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}")
    ax.set(ylabel=ylabel, xlabel="", title=title or ylabel)
    ax.tick_params(axis="x", labelsize=8)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: inside, it hid the bars of low values
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def draw_intervals(ax, rows: pd.DataFrame, x: str, hue: str, order: list, hue_order: list) -> None:
    """Error bars from each row's `ci low` to `ci high` on the bar seaborn drew for its (x, hue)."""
    bounds = {(r[x], r[hue]): (r["ci low"], r["ci high"]) for _, r in rows.iterrows()}
    for level, container in zip(hue_order, ax.containers):
        for category, bar in zip(order, container):
            low, high = bounds.get((category, level), (np.nan, np.nan))
            if np.isfinite(low) and np.isfinite(high):
                ax.vlines(bar.get_x() + bar.get_width() / 2, low, high, color="black", linewidth=1.2)


def fig_presence_by_prompt(table: pd.DataFrame, title: str = "") -> Figure:
    """Heatmap of the judge's presence per prompt (rows) and finding (columns), the asked findings boxed."""
    values = table.drop(columns="asked")
    fig = Figure(figsize=(3.5 + 1.1 * values.shape[1], 1.2 + 0.36 * len(values)))
    ax = fig.add_subplot(1, 1, 1)
    sns.heatmap(values, vmin=0, vmax=1, cmap="rocket_r", annot=True, fmt=".2f", cbar=False, ax=ax, annot_kws={"size": 7})
    for row, asked in enumerate(table["asked"]):
        for column, finding in enumerate(values.columns):
            if finding in asked.split("; "):
                ax.add_patch(Rectangle((column, row), 1, 1, fill=False, edgecolor="tab:blue", linewidth=2.5))
    ax.set(xlabel="judge's presence (boxed: asked for)", ylabel="", title=title)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def fig_confusion(table: pd.DataFrame, title: str = "") -> Figure:
    """One heatmap per finding (rows) and question (columns): prompts' asks against the judge's reading,
    coloured by the share of each ask, annotated with image counts."""
    findings, questions = list(dict.fromkeys(table.finding)), list(dict.fromkeys(table.question))
    fig = Figure(figsize=(3.8 * len(questions), 2.3 * len(findings) + 0.4))
    for i, finding in enumerate(findings):
        for j, question in enumerate(questions):
            cells = table[(table.finding == finding) & (table.question == question)]
            counts = cells.pivot(index="asked", columns="read", values="images").loc[
                list(dict.fromkeys(cells.asked)), list(dict.fromkeys(cells.read))]
            shares = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)
            ax = fig.add_subplot(len(findings), len(questions), i * len(questions) + j + 1)
            sns.heatmap(shares, vmin=0, vmax=1, cmap="rocket_r", annot=counts, fmt="d", cbar=False, ax=ax)
            ax.set(title=f"{finding}: {question}", xlabel="judge reads", ylabel="prompt asks")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def fig_sweep_lines(table: pd.DataFrame, x: str, panels: dict[str, list[str]], targets: dict[str, float] | None = None) -> Figure:
    """One panel per entry of `panels` (title: metrics drawn as lines) against a swept setting.

    E.g. FID, MS-SSIM and the side correct against guidance scale; `targets` draws a dashed line
    at a panel's target value.
    """
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for k, (title, metrics) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for metric in metrics:
            rows = table[table.metric == metric].sort_values(x)
            ax.plot(rows[x], rows.value, "o-", label=metric)
        if title in (targets or {}):
            ax.axhline(targets[title], color="grey", linestyle="--", linewidth=1, label="target")
        ax.set(xlabel=x, ylabel=title if len(metrics) > 1 else metrics[0], title=title)
        if len(metrics) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


GUIDANCE_PANELS = {"FID (judge features)": ["FID (FindingNet (ours))"], "MS-SSIM (same prompt)": ["MS-SSIM within group"],
                   "side correct": ["Pleural Effusion side correct", "Pneumothorax side correct"],
                   "size correct": ["Pleural Effusion size correct", "Pneumothorax size correct"]}


def fig_guidance_sweep(table: pd.DataFrame) -> Figure:
    """`experiments.guidance_table` drawn: fidelity, diversity, side and size correct (with their targets) against guidance."""
    return fig_sweep_lines(table, "guidance scale", GUIDANCE_PANELS, targets={"side correct": 0.9, "size correct": 0.8})


def fig_memorization(audit: pd.DataFrame, synthetic: np.ndarray | None = None, train: np.ndarray | None = None,
                     pairs: int = 6) -> Figure:
    """Nearest-training-image distances with the near-copy threshold; with images, the closest pairs too."""
    with_pairs = synthetic is not None and train is not None
    fig = Figure(figsize=(12, 5.6 if with_pairs else 3.0))
    grid = 2 if with_pairs else 1
    for k, space in enumerate(("pixel", "feature")):
        ax = fig.add_subplot(grid, 2, k + 1)
        ax.hist(audit[f"{space} distance"], bins=40, color=sns.color_palette()[k])
        ax.axvline(audit[f"{space} threshold"].iloc[0], color="black", linestyle="--", label="near-copy threshold")
        ax.set(xlabel=f"distance to nearest training image ({space} space)", ylabel="synthetic images")
        ax.legend(fontsize=7)
    if with_pairs:
        closest = audit.sort_values("pixel distance").head(pairs)
        for c, (index, row) in enumerate(closest.iterrows()):
            for r, (image, label) in enumerate(((synthetic[index], "synthetic"), (train[int(row["pixel nearest"])], "nearest training"))):
                ax = fig.add_subplot(4, pairs, (2 + r) * pairs + c + 1)
                show_image(ax, image)
                if c == 0:
                    ax.set_ylabel(label, fontsize=7)
    fig.tight_layout()
    return fig


def fig_table(table: pd.DataFrame, title: str, width: float = 14.0) -> Figure:
    """A results table as a figure (for the paper-figure set); values as they are in the table."""
    fig = Figure(figsize=(width, 0.45 * (len(table) + 2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.axis("off")
    shown = table.reset_index()
    labels = [str(c).replace(" | ", "\n") for c in shown.columns]  # "metric | prompts | finding" on three lines
    cell = ax.table(cellText=shown.astype(str).to_numpy(), colLabels=labels, loc="center")
    cell.auto_set_font_size(False)
    cell.set_fontsize(7)
    cell.scale(1, 1.3)
    header_lines = max(label.count("\n") + 1 for label in labels)
    for (row, _), box in cell.get_celld().items():
        if row == 0:
            box.set_height(box.get_height() * header_lines)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
