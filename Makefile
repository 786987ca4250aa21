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

# The main job: pretrain -> RL -> evaluation -> runs/tiny/report.md (linglab/pipeline.py). Its wall time, with
# the install when this call did it, goes to runs/tiny/make_run.json.
run:
	@start=$$(date +%s); install=$$(test -f $(STAMP) && echo false || echo true); \
	$(MAKE) --no-print-directory $(STAMP) && \
	$(VENV)/bin/linglab pipeline --preset tiny --out runs/tiny --overwrite --rl-seeds 3 && \
	echo "{\"make_run_seconds\": $$(( $$(date +%s) - start )), \"install_included\": $$install}" > runs/tiny/make_run.json && \
	cat runs/tiny/make_run.json

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check linglab tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
