# make demo  — set up .venv (CPU torch first), install the package alone, run the main job on the demo world
# make test  — the same set-up plus the notebook and test extras, then the test suite
# make lab   — JupyterLab on notebooks/
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# no .pyc for every installed file up front (a third of the install's time): Python compiles
# what it imports, when it first imports it
PIP     := $(BIN)/pip install -q --no-compile
CORE    := $(VENV)/.installed-core
STAMP   := $(VENV)/.installed

.PHONY: demo test lab clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed alone and first: the CPU build, so that no CUDA build is resolved later
$(CORE): $(BIN)/python pyproject.toml
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PIP) -e ".[notebook,test]"
	touch $(STAMP)

demo: $(CORE)
	$(BIN)/influence-nb demo

# the browser test drives Debian's Chromium with Playwright (never `playwright install`);
# where apt-get is not available the test says so and skips
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info
