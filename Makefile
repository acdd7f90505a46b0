# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup lint typecheck unit schema bench bench-quick chaos browser-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tidewire dev

## The whole suite: lint, types, schema freshness, unit, integration, chaos, browser.
test: $(STAMP) browser-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy proto shared
	$(PY) -m pytest -q -x --durations=15 tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

typecheck: $(STAMP)
	$(VENV)/bin/mypy proto shared

schema: $(STAMP)
	$(PY) -m proto.schema > proto/client.schema.json

bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

## The chaos drill: locally against processes, or with K8S_CONTEXT=<ctx> URL=<gateway> SECRET=<jwt secret>
## against a cluster (pods of each component deleted at random while a load client checks invariants).
chaos: $(STAMP)
ifdef K8S_CONTEXT
	$(PY) -m tidewire.drill --url $(URL) --secret $(SECRET) --kubectl-context $(K8S_CONTEXT) --namespace $(or $(NAMESPACE),tidewire)
else
	$(PY) -m pytest -q tests/chaos
endif

## Headless Chromium for the browser tests (Debian package; Playwright's own download cannot work offline).
browser-deps: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || ( (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1)) || echo "chromium not installed: browser tests will be skipped" )
	@$(PY) -c 'import playwright' 2>/dev/null || $(PY) -m pip install -q playwright

clean:
	rm -rf $(VENV) .tidewire .pytest_cache .mypy_cache .ruff_cache
