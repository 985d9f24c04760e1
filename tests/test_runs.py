"""The notebook runner: parameters, manifests, and failures that keep earlier results."""

import json

import nbformat
import pytest

from roentgen_lib import config, runs


def write_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('from typing import Optional\n\nprofile: str = "demo"\nseed: Optional[int] = None',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_parse_overrides_reads_literals():
    assert config.parse_overrides(["seed=3", "data_source=mimic", "n_images=None"]) == {
        "seed": 3, "data_source": "mimic", "n_images": None}
    with pytest.raises(config.ConfigError, match="expected key=value"):
        config.parse_overrides(["seed"])


def test_bad_parameters_stop_before_running(tmp_path):
    write_notebook(tmp_path / "01_ok.ipynb", "print(seed)")
    with pytest.raises(config.ConfigError, match="parameter 'seed' must be int"):
        runs.run("tiny", overrides={"seed": "x"}, out_dir=tmp_path / "out", notebooks_dir=tmp_path)
    with pytest.raises(config.ConfigError, match=r"\['image_size'\] are not declared"):
        runs.run("tiny", overrides={"image_size": 64}, out_dir=tmp_path / "out", notebooks_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_failure_stops_the_run_and_keeps_earlier_results(tmp_path):
    out = tmp_path / "out"
    write_notebook(tmp_path / "01_ok.ipynb", "print('seed', seed)")
    write_notebook(tmp_path / "02_fails.ipynb", "print('fine')")
    write_notebook(tmp_path / "03_never.ipynb", "print('never')")
    assert [r["status"] for r in runs.run("tiny", overrides={"seed": 5}, out_dir=out, notebooks_dir=tmp_path)] == ["ok"] * 3
    good = (out / "02_fails.ipynb").read_text()

    write_notebook(tmp_path / "02_fails.ipynb", "x = 1\nraise ValueError('broken on purpose')")
    records = runs.run("tiny", out_dir=out, notebooks_dir=tmp_path)
    assert [r["status"] for r in records] == ["ok", "failed"]
    assert records[1]["error"] == "ValueError: broken on purpose" and records[1]["cell"] is not None
    assert (out / "02_fails.ipynb").read_text() == good  # the previous good run is intact
    assert (out / "02_fails.failed.ipynb").exists()
    manifest = json.loads((out / "02_fails.manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["profile"] == "tiny"
    first = json.loads((out / "01_ok.manifest.json").read_text())
    assert first["parameters"] == {"profile": "tiny"} and first["wall_seconds"] > 0
    assert first["peak_memory_mb"] > 10 and first["git"]["sha"] and "torch" in first["packages"]


def test_rerun_continues_from_the_failed_notebook(tmp_path, capsys):
    out = tmp_path / "out"
    write_notebook(tmp_path / "01_ok.ipynb", "print('one')")
    write_notebook(tmp_path / "02_fails.ipynb", "raise ValueError('broken on purpose')")
    write_notebook(tmp_path / "03_after.ipynb", "print('three')")
    assert [r["status"] for r in runs.run("tiny", out_dir=out, notebooks_dir=tmp_path)] == ["ok", "failed"]
    assert "continue with: python -m roentgen_lib.runs --profile tiny --from 02_fails" in capsys.readouterr().out
    first = (out / "01_ok.manifest.json").read_text()

    write_notebook(tmp_path / "02_fails.ipynb", "print('fixed')")
    records = runs.run("tiny", out_dir=out, notebooks_dir=tmp_path, start_from="02_fails")
    assert [(r["notebook"], r["status"]) for r in records] == [("02_fails.ipynb", "ok"), ("03_after.ipynb", "ok")]
    assert (out / "01_ok.manifest.json").read_text() == first  # the finished notebook was not re-run
    with pytest.raises(config.ConfigError, match="--from '07' matches no notebook.*01_ok, 02_fails, 03_after"):
        runs.run("tiny", out_dir=out, notebooks_dir=tmp_path, start_from="07")


def test_main_reports_bad_arguments(capsys):
    assert runs.main(["--profile", "huge"]) == 2
    assert "allowed: tiny, demo, paper" in capsys.readouterr().err


def test_git_state_counts_changes_to_code_not_the_runs_own_outputs(tmp_path):
    import subprocess

    from roentgen_lib.provenance import git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "figures" / "f.json").write_text('{"run": 2}')  # a run rewrote its figure
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True
    assert git_state(tmp_path / "nowhere")["sha"] is None  # not a checkout (or no such folder)
