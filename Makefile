# Two commands do all set-up on a fresh machine: `make up` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp built with native CPU flags segfaults on decode here; this portable build works.
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a native build.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF
LLAMA_VERSION := 0.3.36

.PHONY: up install install-test test test-sqlite test-postgres clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(VENV)/.llama-built: | $(BIN)/python
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --no-cache-dir "llama-cpp-python==$(LLAMA_VERSION)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.llama-built
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

up: install
	$(BIN)/keel up

test: install-test test-sqlite test-postgres

test-sqlite:
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-postgres:
	KEEL_TEST_DATABASE=postgres $(BIN)/python -m pytest -q -p no:cacheprovider -m store

clean:
	rm -rf $(VENV) .keel
