# Two set-up commands: `make run` (score examples/) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PIP_TORCH_ARGS ?=
CLIP_MODEL_DIR ?= models/clip-vit-base-patch32
export CLIP_MODEL_DIR

.PHONY: run test test-fast bench lint clean tiny-clip

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_TORCH_ARGS) -r requirements/torch-cpu.txt
	$(PIP) install -q -e ".[torch,onnx,openvino,export,hub,lambda,serve,dev]"
	touch $@

# The main job: score the shipped examples. Fetches the model on first use when there is network.
run: $(VENV)/.installed
	@if [ ! -f "$(CLIP_MODEL_DIR)/config.json" ]; then \
	  echo "model directory $(CLIP_MODEL_DIR) is missing: fetching openai/clip-vit-base-patch32"; \
	  $(PY) -m similarity model fetch --to "$(CLIP_MODEL_DIR)" || exit 3; \
	  $(PY) -m similarity model export "$(CLIP_MODEL_DIR)"; \
	fi
	$(PY) -m similarity score examples/challenge_set.csv -o out/challenge_set_scored.csv --model "$(CLIP_MODEL_DIR)"
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

clean:
	rm -rf $(VENV) out build dist src/*.egg-info .pytest_cache
