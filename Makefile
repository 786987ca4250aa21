# The two README commands. Each creates .venv and installs what it needs on a fresh machine.
# torch is pinned to the exact version served as a local CPU wheel; an unpinned torch would pull CUDA.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.linglab-installed

.PHONY: run test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: pretrain, then RL from the final checkpoint (its report has the before/after evaluation).
run: $(STAMP)
	$(VENV)/bin/linglab train --preset tiny --out runs/tiny --overwrite
	$(VENV)/bin/linglab rl --ckpt runs/tiny/final --out runs/tiny/rl --overwrite

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check linglab tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
