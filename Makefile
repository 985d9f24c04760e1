# RoentGen compendium. `make reproduce` and `make test` set everything up on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= demo
# pytest workers and threads per worker: on 2 cores two one-thread workers test faster than one
# two-thread process (docs/testing.md); the notebook kernels nbval starts inherit the thread count.
TEST_WORKERS ?= 2
TEST_THREADS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n / $(TEST_WORKERS) > 1 ? n / $(TEST_WORKERS) : 1 )))
# Kernel paths of the CPU libraries (README, Testing). The committed tiny runs are made on the generic
# path, which no machine takes by itself, so `make test` always compares one CPU's floats with another's.
GENERIC_CPU := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
AVX2_CPU := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

.PHONY: setup reproduce test test-cpu-paths lab tiny-runs base smoke-paper bench bench-scale bench-train bench-sample probe-position clean

setup: $(STAMP)

# The venv is created once and reused; reinstalled only when the pins in pyproject.toml change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

# After a failure: `make reproduce FROM=04_sampling` continues from that notebook.
reproduce: setup
	$(PY) -m roentgen_lib.runs --profile $(PROFILE) $(if $(FROM),--from $(FROM))

# nbval re-executes the tiny runs into data/tiny: emptied first, so a stale base or run from older code
# cannot change what the notebooks print (the tiny profile is the tests' scratch space).
test: setup
	rm -rf data/tiny
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS) papermill_runs/tiny tests \
		--nbval --nbval-current-env

# The whole suite on each kernel path this CPU can stand in for: native, AVX2, generic (about 3x `make test`).
test-cpu-paths: setup
	$(MAKE) test
	env $(AVX2_CPU) $(MAKE) test
	env ATEN_CPU_CAPABILITY=default $(MAKE) test

# The project's own tiny Stable Diffusion, pretrained on general-domain scenes (built once, cached
# in data/<profile>/base_model; the notebooks build it themselves when it is missing).
base: setup
	$(PY) -m roentgen_lib.pretrain --profile $(PROFILE)

# The paper profile's code path end to end at 512 px on Stable Diffusion 1.5's architecture with random
# weights and a generated MIMIC-CXR-format tree: proves code, shapes and memory, not image quality
# (docs/paper_scale.md). Give your own with SMOKE_PARAMS="-p base_model=DIR -p mimic_root=DIR".
SMOKE_MIMIC := data/paper_smoke/mimic
smoke-paper: setup
	$(PY) -m roentgen_lib.data.mimic_standin $(SMOKE_MIMIC) --studies 32
	$(PY) -m roentgen_lib.runs --profile paper_smoke -p mimic_root=$(SMOKE_MIMIC) $(SMOKE_PARAMS)
	$(PY) -m roentgen_lib.smoke --profile paper_smoke

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

# Regenerate the committed tiny-profile executed notebooks that nbval compares against: from an empty
# data/tiny, on the generic kernel path.
tiny-runs: setup
	rm -rf data/tiny
	env $(GENERIC_CPU) $(PY) -m roentgen_lib.runs --profile tiny

bench: setup
	$(PY) tests/bench/bench_labeler.py

# Our training loop against diffusers' train_text_to_image.py (kept in the ignored .reference/).
bench-train: setup
	$(PY) tests/bench/bench_train.py

# Our batched sampler against a plain StableDiffusionPipeline call loop (same model, prompts, steps).
bench-sample: setup
	$(PY) tests/bench/bench_sample.py

# Peak memory of training, synthetic generation and evaluation at N and 8N images: flat in dataset size.
bench-scale: setup
	$(PY) tests/bench/bench_scale.py

# Can a prompt's position word steer where the demo model draws? (README, Evaluation; ~2 min)
probe-position: setup
	$(PY) tests/bench/probe_position_binding.py

clean:
	rm -rf data papermill_runs/demo papermill_runs/paper papermill_runs/paper_smoke
