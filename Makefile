# Two set-up commands: `make run` (score examples/) and `make test` (the whole suite).
#
# Three virtual environments, each made on first use:
#   $(RUN_VENV)   `make run`: the library, the CLI and the [cpu] extra (ONNX Runtime, OpenVINO). No torch.
#   $(TOOLS_VENV) only when the model directory lacks files: `model fetch` ([hub]) and `model export`
#                 ([export]: CPU torch + transformers + onnx). Used once per model, then not again.
#   $(VENV)       `make test` / `make lint` / `make bench`: every extra and the test tools.
PYTHON ?= python3
VENV ?= .venv
RUN_VENV ?= .venv-run
TOOLS_VENV ?= .venv-tools
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PIP_TORCH_ARGS ?=
CLIP_MODEL_DIR ?= models/clip-vit-base-patch32
# Where `make run` exports ONNX files for a model directory that has none (the directory itself is
# never written to; build/ is ignored by git).
EXPORT_ROOT ?= build/models
export CLIP_MODEL_DIR

.PHONY: run test test-fast bench lint clean tiny-clip sizes airflow-venv

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_TORCH_ARGS) -r requirements/torch-cpu.txt
	$(PIP) install -q -e ".[cpu,torch,export,hub,lambda,parquet,cache,dev]"
	touch $@

$(RUN_VENV)/.installed: pyproject.toml
	test -x $(RUN_VENV)/bin/python || $(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q --upgrade pip
	$(RUN_VENV)/bin/pip install -q -e ".[cpu]"
	touch $@

$(TOOLS_VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --upgrade pip
	$(TOOLS_VENV)/bin/pip install -q $(PIP_TORCH_ARGS) -r requirements/torch-cpu.txt
	$(TOOLS_VENV)/bin/pip install -q -e ".[export,hub]"
	touch $@

# The main job: score the shipped examples on the CPU without torch. A model directory without
# config.json is fetched (needs network); one without ONNX files is exported once into
# $(EXPORT_ROOT)/<name> (links to its files plus onnx/), both with the tools venv. Exit 3 when the
# model cannot be had.
run: $(RUN_VENV)/.installed
	@set -e; model="$(CLIP_MODEL_DIR)"; \
	if [ ! -f "$$model/config.json" ]; then \
	  echo "model directory $$model is missing: fetching openai/clip-vit-base-patch32"; \
	  $(MAKE) --no-print-directory $(TOOLS_VENV)/.installed; \
	  $(TOOLS_VENV)/bin/python -m similarity model fetch --to "$$model" || exit 3; \
	fi; \
	if [ ! -f "$$model/onnx/vision.onnx" ] || [ ! -f "$$model/onnx/text.onnx" ]; then \
	  dest="$(EXPORT_ROOT)/$$(basename "$$model")"; \
	  if [ ! -f "$$dest/onnx/text.onnx" ] || [ "$$model/model.safetensors" -nt "$$dest/onnx/text.onnx" ]; then \
	    echo "$$model has no ONNX files: exporting them once into $$dest"; \
	    $(MAKE) --no-print-directory $(TOOLS_VENV)/.installed; \
	    rm -rf "$$dest"; mkdir -p "$$dest"; src="$$(cd "$$model" && pwd)"; \
	    for f in $$(ls -A "$$src"); do [ "$$f" = onnx ] || ln -s "$$src/$$f" "$$dest/$$f"; done; \
	    $(TOOLS_VENV)/bin/python -m similarity model export "$$dest" || exit 3; \
	  fi; \
	  model="$$dest"; \
	fi; \
	$(RUN_VENV)/bin/python -m similarity score examples/challenge_set.csv -o out/challenge_set_scored.csv --model "$$model"
	@echo "--- out/challenge_set_scored.csv"; cat out/challenge_set_scored.csv

# Lint first (ruff, mypy, cfn-lint), then every test tier: unit, integration, e2e, infrastructure.
test: lint
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests/unit tests/integration

# glibc's allocator maps and unmaps big activation buffers on every forward; the MALLOC_ settings keep
# them in the heap (the container sets the same). OMP_WAIT_POLICY is what the library sets before it
# first imports torch; the bench imports torch earlier, for the baseline, so it is set here for both
# sides. The wheel only supplies CLIP's real BPE vocabulary file.
bench: $(VENV)/.installed
	@ls bench/.cache/open_clip_torch-*.whl >/dev/null 2>&1 || $(PIP) download -q --no-deps -d bench/.cache open_clip_torch==3.3.0 || true
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=8589934592 OMP_WAIT_POLICY=PASSIVE $(PY) bench/run.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/cfn-lint template.yaml

# Regenerate the committed test model (deterministic; ~2 minutes on 2 cores).
tiny-clip: $(VENV)/.installed
	$(PY) tests/fixtures/make_tiny_clip.py

# The example DAG (examples/airflow/) is tested in a venv of its own: Airflow pins ~140 packages
# (fastapi among them, which Ray Serve also uses) that the project's own venv should not inherit.
# tests/e2e/test_airflow_dag.py uses it when it exists and skips, saying so, when it does not.
AIRFLOW_VENV ?= .venv-airflow
airflow-venv: $(AIRFLOW_VENV)/.installed
$(AIRFLOW_VENV)/.installed:
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install -q "apache-airflow==3.3.2" "requests>=2.32"
	touch $@

# Disk used by each virtual environment (the README's figures).
sizes:
	@du -sh $(RUN_VENV) $(TOOLS_VENV) $(VENV) 2>/dev/null || true

clean:
	rm -rf $(VENV) $(RUN_VENV) $(TOOLS_VENV) $(AIRFLOW_VENV) out build dist src/*.egg-info .pytest_cache
