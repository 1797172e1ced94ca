# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv extras demo test lint bench clean

venv: $(STAMP)

# torch first, from the pinned CPU wheel, so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The optional runtimes (target.runtime: openvino, executorch): about a minute, and heavy
# (ExecuTorch pulls torchao and coremltools). Their tests are skipped without them.
EXTRAS := $(VENV)/.extras
extras: $(EXTRAS)

$(EXTRAS): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,openvino,executorch]'
	touch $(EXTRAS)

demo: $(STAMP)
	$(VENV)/bin/paretoopt search --space search_spaces/conv.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# Every script runs (about 3 hours on 2 cores); the exit status says whether all targets held.
BENCHMARKS := pruning lowrank quantization clustering augmentation latency runtimes search cost cost_search streaming workload
bench: $(STAMP)
	@status=0; for script in $(BENCHMARKS); do \
		echo "== benchmarks/$$script.py"; $(PY) benchmarks/$$script.py || status=1; \
	done; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check paretoopt tests benchmarks app.py
	$(VENV)/bin/ruff format --check paretoopt tests benchmarks app.py
	$(VENV)/bin/lint-imports  # the torch-free data layer and the stage order (pyproject.toml)

clean:
	rm -rf $(VENV) results/*/ .pytest_cache
