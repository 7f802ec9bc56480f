# Relay: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch: a plain requirement resolves to a multi-GB CUDA build. Without a GPU, install the CPU
# build first (on the project's CI machines `torch==2.13.0` is a CPU wheel on local disk), and the
# project's own range (torch>=2.3,<3) is then already met.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint bench results clean venv

venv: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	if ! nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/relay demo

# lint: the import-layer contracts (pyproject.toml, [tool.importlinter]; on .ci/lint_tree.py's tree of links,
# where relay.kernels and relay.launch sit under relay/ as in a wheel) and ruff; `make test` runs it
lint: venv
	PYTHONPATH=$$($(PY) .ci/lint_tree.py) $(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=15

bench: venv
	$(PY) bench/throttle.py
	$(PY) bench/collectives.py
	$(PY) bench/transport.py
	$(PY) bench/training.py
	$(PY) bench/stragglers.py
	$(PY) bench/validate.py
	$(PY) bench/fullsize.py
	$(PY) bench/backend_overlap.py

results: venv
	$(VENV)/bin/relay breakeven --preset headline

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
