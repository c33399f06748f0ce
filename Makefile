# Two commands set up a fresh machine:  make reproduce  and  make test  (see README.md).
# Both create .venv if needed and install the package with what the notebooks need.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# Installed first when no torch is importable: a CPU build avoids a multi-GB CUDA download.
# Override e.g. with  make test TORCH_SPEC="torch==2.6.0"  or a CUDA build of your choice.
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= notebooks,gemma,test
STAMP      := $(VENV)/.installed

.PHONY: setup reproduce test unit lint lab benchmark clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

## reproduce: execute every notebook headless (in place), write results/, print a summary
reproduce: setup
	$(PY) scripts/run_notebooks.py

## test: lint, unit tests, and every notebook under nbval
# nbval runs the notebooks in file order, so 04 reuses what 01-03 saved: all of them write to
# one fresh temporary folder (ENTK_RESULTS_DIR), removed afterwards, so the tests never touch
# the committed results/ (make reproduce writes those). The cell timeout is generous: this
# 2-core VM has had days when a process got a quarter of a core.
test: setup lint
	@results="$$(mktemp -d "$${TMPDIR:-/tmp}/entk-test-results.XXXXXX")" && \
		trap 'rm -rf "$$results"' EXIT && echo "test results in $$results (removed after)" && \
		ENTK_RESULTS_DIR="$$results" $(PY) -m pytest tests notebooks --nbval-lax \
		--nbval-current-env --nbval-cell-timeout=3600 -p no:cacheprovider

unit: setup
	$(PY) -m pytest tests -q

lint: setup
	$(PY) -m ruff check entk_helpers tests benchmarks scripts notebooks/conftest.py
	$(PY) -m ruff check notebooks --select F,E9   # undefined or unused names in the notebooks

## lab: JupyterLab on the notebooks
lab: setup
	$(VENV)/bin/jupyter lab notebooks

benchmark: setup
	$(PY) benchmarks/bench_mlp_entk.py
	$(PY) benchmarks/bench_mlp_sequence.py
	$(PY) benchmarks/bench_training.py

clean-results:
	rm -rf results/*/
