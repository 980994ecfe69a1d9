# defai-kit: the two commands a user needs are `make demo` and `make test`.
# Both set up everything themselves (virtualenv, pinned packages, PostgreSQL binaries).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# A folder of local wheels (this workplace keeps the CPU torch wheel there). Ignored when absent.
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
# Extra index for torch on other machines, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
EXTRA_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match,)
STAMP := $(VENV)/.installed
# Bytecode is written, under .venv/ (this workplace sets PYTHONDONTWRITEBYTECODE): every test process, notebook kernel
# and worker then loads the kit and its libraries in about 1.7 s, instead of compiling them again (4.5 s).
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache

.PHONY: setup system demo test check-notebooks test-notebooks test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(FIND_LINKS) $(EXTRA_INDEX) -e ".[dev,bench]"
	@touch $(STAMP)

# PostgreSQL server binaries for the store tests (the tests start and stop their own server).
system:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
	  echo "installing PostgreSQL server binaries (Debian package postgresql)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi; \
	fi

demo: setup
	$(BIN)/defai demo

# The notebook tests and the integration tests share nothing (each makes its own stores, servers and homes), so they
# run side by side, one per core; each prints its report when it ends.
test: setup system check-notebooks
	@$(MAKE) --no-print-directory -j2 --output-sync=target --assume-old=$(STAMP) test-notebooks test-integration

# The package must be exactly what the notebooks export, and the notebooks must be clean.
check-notebooks: setup
	@bash .ci/check-notebooks

test-notebooks: setup
	$(BIN)/pytest --nbval-lax nbs/ -p no:cacheprovider -q

test-integration: setup
	$(BIN)/pytest tests/ -q

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .defai
