# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo demo-full test test-fast docs docs-check chromium dist vendor-katex bench clean

$(STAMP): pyproject.toml constraints.txt benchmarks/requirements-bench.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[hf,mllm,plot,study,dev,docs]'
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

# The docs build is strict and NOT quiet: with -q MkDocs emits no warnings, so --strict counts none.
test: $(STAMP)
	# two pytest workers (one per core on CI), one torch thread each: the tiny models gain nothing from more
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)
	$(BIN)/mkdocs build --strict

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# Opens the key pages of the built site in headless Chromium at 1400 px: formulas rendered by
# the bundled KaTeX, images and fonts served, nothing fetched from another host; screenshots
# go to site-shots/. Not part of `make test` (it needs Debian's chromium package).
docs-check: $(STAMP) chromium
	$(BIN)/mkdocs build --strict
	$(BIN)/python scripts/site_check.py site --screenshots site-shots

chromium:
	command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }

# sdist + wheel into dist/, metadata checked by twine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

# Re-vendor the KaTeX copy the docs render formulas with (npm registry).
vendor-katex:
	bash scripts/vendor_katex.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py --quick

clean:
	rm -rf $(VENV) site site-shots dist build .pytest_cache .hypothesis
