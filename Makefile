# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo demo-full test test-fast docs bench clean

$(STAMP): pyproject.toml constraints.txt benchmarks/requirements-bench.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[hf,mllm,plot,dev,docs]'
	# Liger-Kernel's chunked losses are plain PyTorch: --no-deps keeps Triton (~1 GB) and torch out
	$(BIN)/pip install -q --no-deps 'liger-kernel==0.8.5'
	# Benchmark peers (benchmarks/_peers.py): TRL's losses are plain PyTorch; --no-deps keeps datasets/pyarrow out
	$(BIN)/pip install -q --no-deps -r benchmarks/requirements-bench.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

demo-full: $(STAMP)
	$(BIN)/python examples/demo.py --full

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider
	$(BIN)/mkdocs build --strict -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py --quick

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
