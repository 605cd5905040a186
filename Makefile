# The two commands: `make book` and `make test`. Everything else here is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdlib-installed
# cffconvert needs jsonschema<4 and Jupyter Book jsonschema 4: it gets a virtual environment of its own.
TOOLS  := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: book test install tools nbval html browser execute clean gpu-check gpu-check-dry-run gpu-wheels

## install: create .venv and install kdlib with the pinned versions (skipped when nothing changed)
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[book,dev]"
	@touch $@

## tools: .venv-tools with the pinned cffconvert (see .ci/tools-requirements.txt)
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): .ci/tools-requirements.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --disable-pip-version-check -r .ci/tools-requirements.txt
	@touch $@

## test: lint (code, workflows, CITATION.cff), unit tests, notebooks under nbval (smoke profile),
## book build (-W), browser check
test: install tools
	$(BIN)/ruff check kdlib tests benchmarks conftest.py book/_ext notebooks
	$(BIN)/actionlint .github/workflows/*.yml
	$(TOOLS)/bin/cffconvert --validate -i CITATION.cff
	$(BIN)/pytest -q tests --ignore=tests/test_browser.py
	$(MAKE) --no-print-directory nbval html browser

nbval: install
	@cache=$$(mktemp -d); \
	KDLIB_PROFILE=smoke KDLIB_CACHE=$$cache $(BIN)/pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=600 $(NOTEBOOKS); rc=$$?; rm -rf $$cache; exit $$rc

html: install
	$(BIN)/jupyter-book build . -W -n --keep-going

## browser: open every chapter page in headless Chromium (installed from Debian when missing and root)
browser: install
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed and not root: the browser check will be skipped"; }
	$(BIN)/pytest -q -rs tests/test_browser.py

## book: train the book's grid, execute every chapter from the cache, build the HTML (see "The time
## budget of make book" on the How-this-book-is-built page). Every run trains with one torch thread,
## so a machine with the same CPU gives the committed records back bit for bit, whatever its core count:
## `kdlib bench` trains the teacher and the grid one run per core (one per GPU on a GPU machine), then
## the chapters (their ablations) execute JOBS at a time, then the chapters that read every other
## chapter's runs (notebooks/2*), then the HTML.
PROFILE ?= book
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
LAST    := $(filter notebooks/2%,$(NOTEBOOKS))
RUN_NB  := env OMP_NUM_THREADS=1 KDLIB_PROFILE=$(PROFILE) $(BIN)/jupyter execute --inplace --timeout=-1 --kernel_name=python3

book: install
	$(BIN)/kdlib bench --profile $(PROFILE) --quiet
	printf '%s\n' $(filter-out $(LAST),$(NOTEBOOKS)) | xargs -P $(JOBS) -I{} $(RUN_NB) {}
	$(if $(LAST),$(RUN_NB) $(LAST))
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book is in $(CURDIR)/_build/html/index.html"

## execute: run notebooks in place with the book profile, e.g. make execute NB=notebooks/10_sakd.ipynb
NB ?= $(NOTEBOOKS)
execute: install
	$(RUN_NB) $(NB)

## gpu-check: on the device machine (its python3, no venv): one call of <= 9 minutes, results under $OUT
gpu-check:
	bash benchmarks/gpu_check.sh

## gpu-check-dry-run: without a GPU: are the wheels, scripts, files and imports the device run needs there?
gpu-check-dry-run: install
	PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh --dry-run

## gpu-wheels: download the wheels benchmarks/gpu_wheels.txt names into .whl/ (carried to the device)
gpu-wheels: install
	$(BIN)/python benchmarks/gpu_wheels.py download

clean:
	rm -rf _build .pytest_cache .ruff_cache build dist gpu_check_out
