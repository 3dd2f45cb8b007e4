# Each target does its own set-up on a fresh machine: create or reuse .venv, install, then run.
# Every install step says what it installs and shows pip's own progress (a fresh machine takes minutes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-core
DEV_STAMP := $(VENV)/.installed-dev
# The CPU wheel lies on the dev machines' disk; a user's existing torch in the venv is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint install clean

# gpt3zh and what it needs to run: enough for `make demo`.
$(STAMP): pyproject.toml
	@echo "==> $(VENV): virtualenv (created if missing)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> pip: upgrade"
	$(PY) -m pip install -q --upgrade pip
	@echo "==> torch: $(TORCH_SPEC), unless the venv already has a torch (about 200 MB, a minute or two)"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	@echo "==> gpt3zh (editable) with numpy, safetensors, tokenizers, jieba, pyyaml, tqdm"
	$(PY) -m pip install -e .
	touch $(STAMP)

# The [dev] extra on top: pytest, transformers, FastAPI/uvicorn, tensorboard, matplotlib, openai, selenium.
$(DEV_STAMP): $(STAMP)
	@echo "==> gpt3zh[dev]: test, serving, Hugging Face and training extras (a few minutes on a fresh machine)"
	$(PY) -m pip install -e ".[dev]"
	touch $(DEV_STAMP)

install: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/gpt3zh demo

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
