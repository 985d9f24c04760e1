# RoentGen compendium. `make reproduce` and `make test` set everything up on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= demo

.PHONY: setup reproduce test lab tiny-runs base bench bench-train bench-sample probe-position clean

setup: $(STAMP)

# The venv is created once and reused; reinstalled only when the pins in pyproject.toml change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

# After a failure: `make reproduce FROM=04_sampling` continues from that notebook.
reproduce: setup
	$(PY) -m roentgen_lib.runs --profile $(PROFILE) $(if $(FROM),--from $(FROM))

test: setup
	$(PY) -m pytest tests papermill_runs/tiny --nbval --nbval-current-env

# The project's own tiny Stable Diffusion, pretrained on general-domain scenes (built once, cached
# in data/<profile>/base_model; the notebooks build it themselves when it is missing).
base: setup
	$(PY) -m roentgen_lib.pretrain --profile $(PROFILE)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Regenerate the committed tiny-profile executed notebooks that nbval compares against.
tiny-runs: setup
	$(PY) -m roentgen_lib.runs --profile tiny

bench: setup
	$(PY) tests/bench/bench_labeler.py

# Our training loop against diffusers' train_text_to_image.py (kept in the ignored .reference/).
bench-train: setup
	$(PY) tests/bench/bench_train.py

# Our batched sampler against a plain StableDiffusionPipeline call loop (same model, prompts, steps).
bench-sample: setup
	$(PY) tests/bench/bench_sample.py

# Can a prompt's position word steer where the demo model draws? (README, Evaluation; ~2 min)
probe-position: setup
	$(PY) tests/bench/probe_position_binding.py

clean:
	rm -rf data papermill_runs/demo papermill_runs/paper
