# make demo  — set up .venv (CPU torch first), install the project, run the main job on the demo world
# make test  — same set-up, then the test suite
# make lab   — JupyterLab on notebooks/
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lab clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed alone and first: the CPU build, so that no CUDA build is resolved later
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[notebook,test]"
	touch $(STAMP)

demo: $(STAMP)
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
