# make demo  — set up .venv (CPU torch first), install the package alone, run the main job on the demo world
# make test  — the same set-up plus the notebook and test extras, then the whole test suite
#              (notebooks and the browser included), on every core
# make check — the inner loop: unit and exact-math tests on tiny models (no notebooks, browser,
#              retraining or demo build), on every core
# make lab   — JupyterLab on notebooks/
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# no .pyc for every installed file up front (a third of the install's time): Python compiles
# what it imports, when it first imports it
PIP     := $(BIN)/pip install -q --no-compile
CORE    := $(VENV)/.installed-core
STAMP   := $(VENV)/.installed

.PHONY: demo test check lab clean browser demo-factors

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
# without it `make test` fails (the browser tests are part of the suite, never skipped)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		(echo "chromium is needed by the browser tests: apt-get install -y chromium" && false)

# pytest-xdist: one worker per core; a notebook and the claims read from it share a worker
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n auto --dist loadgroup tests

# maintainers, after rebuilding the demo world (python -m influence_nb.demo.build): the factors
# that Influence.demo() loads, DEMO_FIT's, fitted by the package's own fit into the assets
# (eigenvectors in float16: 14 MiB, scores within 1e-5 of float32's)
demo-factors: $(CORE)
	$(BIN)/python -c "import torch; from influence_nb import demo; \
	from influence_nb.session import DEMO_FACTORS, DEMO_FIT, Influence; \
	Influence(*demo.load()).fit(DEMO_FIT).save(demo.ASSETS / DEMO_FACTORS, torch.float16)"
	rm -f influence_nb/demo/assets/factors/.lock

check: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow" tests

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) build *.egg-info
