"""Notebook contracts: thin, parameterised like the config, stripped, and their tiny runs current.

nbval (run by `make test` over papermill_runs/tiny) re-executes the committed tiny runs and compares
their outputs; the tests here make sure those runs are of the current source notebooks.
"""

import ast
import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from nbval.plugin import get_sanitize_patterns

from roentgen_lib import config, figures, runs

NOTEBOOKS = sorted(runs.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
TINY_RUNS = runs.RUNS_DIR / "tiny"


def code_cells(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def test_there_are_notebooks():
    assert [nb.stem for nb in NOTEBOOKS][:1] == ["01_data_prep"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin_and_stripped(notebook):
    nb = nbformat.read(notebook, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None, "source notebooks are stored without outputs"
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef)), "logic belongs in roentgen_lib"
        if "parameters" not in cell.metadata.get("tags", []):  # one documented line per parameter may run longer
            assert len(cell.source.splitlines()) <= 15


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_match_the_config(notebook):
    params = papermill.inspect_notebook(str(notebook))
    cell = next(c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    declared = [line.split(":")[0] for line in cell.source.splitlines() if re.match(r"\w+\s*:", line)]
    assert list(params) == declared, "papermill cannot parse a parameter line (an '=' in its comment?); the runner would drop it"
    assert params["profile"]["default"] == '"demo"'
    fields = set(config.parameter_names())
    for name, info in params.items():
        if name != "profile":
            assert name in fields, f"{name} is not a config field"
            assert info["default"] == "None", f"{name} must default to None (the profile's value)"
            assert info["help"], f"{name} needs a help comment"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_tiny_run_is_of_the_current_notebook(notebook):
    run = TINY_RUNS / notebook.name
    assert run.exists(), "run `make tiny-runs` and commit papermill_runs/tiny"
    assert code_cells(run) == code_cells(notebook), "stale tiny run: `make tiny-runs`"
    injected = [c for c in nbformat.read(run, as_version=4).cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert 'profile = "tiny"' in injected[0].source


def test_the_runner_executes_a_notebook_and_writes_its_manifest(tmp_path):
    """nbval executes every notebook (`make test`); this runs one through papermill as `make reproduce` does."""
    records = runs.run("tiny", only=["01_data_prep"], overrides={"output_dir": str(tmp_path / "dataset")},
                       out_dir=tmp_path / "runs")
    assert [r["status"] for r in records] == ["ok"]
    manifest = json.loads((tmp_path / "runs" / "01_data_prep.manifest.json").read_text())
    summary = manifest["datasets"]["cxr_dataset"]
    assert len(summary["fingerprint"]) == 64 and sum(summary["rows"].values()) == 48
    assert summary["skipped"]["no_impression_or_findings"] == 28
    assert manifest["parameters"] == {"profile": "tiny", "output_dir": str(tmp_path / "dataset")}


def sanitized(text: str) -> str:
    """`text` as nbval compares it in `make test` (tests/nbval_sanitize.cfg)."""
    for regex, replace in get_sanitize_patterns((Path(__file__).parent / "nbval_sanitize.cfg").read_text()):
        text = re.sub(regex, replace, text)
    return text


def test_nbval_compares_a_tables_shape_labels_and_counts_but_not_its_decimals():
    table = pd.DataFrame({"AUROC": [0.4839, 1.0], "FID": [8.3e-05, 12.5], "images": [12, 12]}, index=["base", "full"])
    other_cpu = table.assign(AUROC=[0.5, 1.0], FID=[0.000088, 9.25])  # narrower columns: "0.5" against "0.4839"
    wide = {name: pd.concat({f"metric {k}": t for k in range(6)}, axis=1) for name, t in (("a", table), ("b", other_cpu))}
    with pd.option_context("display.max_columns", 20, "display.width", 80, "display.expand_frame_repr", True):
        figures.show_tables_unwrapped()
        for show in (repr, pd.DataFrame.to_html):
            assert sanitized(show(table)) == sanitized(show(other_cpu))
            assert sanitized(show(wide["a"])) == sanitized(show(wide["b"]))  # wrapped, they would differ
            for changed in (table.assign(images=[12, 13]), table.rename(index={"full": "lora"}),
                            table.rename(columns={"FID": "KID"}), table.iloc[:1], table.assign(FID=[None, 12.5])):
                assert sanitized(show(changed)) != sanitized(show(table))
