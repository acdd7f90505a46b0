# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup lint typecheck unit schema bench bench-quick ledger chaos chaos-cluster cluster image test-image image-deps browser-deps node-deps system-deps clean

# every runtime package is type-checked (strict, pyproject.toml)
TYPED := proto shared gateway orchestrator tool_workers tidewire

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tidewire dev

## The whole suite: lint, format, types, schema freshness, unit, integration, chaos, browser,
## and the real OpenAI / Vercel AI SDK clients (the clustered topology: make chaos-cluster; the
## container image: make test-image).
test: $(STAMP) browser-deps node-deps system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED)
	$(PY) -m pytest -q -x --durations=15 -m "not cluster and not image" tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy $(TYPED)

schema: $(STAMP)
	$(PY) -m proto.schema > proto/client.schema.json

bench: $(STAMP)
	$(PY) -m bench.run

bench-quick: $(STAMP)
	$(PY) -m bench.run --quick

## The per-turn ledger of one session (Redis commands, Postgres transactions, NATS messages, CPU per process)
ledger: $(STAMP)
	$(PY) -m bench.ledger --markdown

## The production topology on one machine: HAProxy, 3 gateways, 3 orchestrators, 2 tool workers,
## a 3-node NATS cluster (R3), Redis + replica + 3 Sentinels, Postgres + synchronous standby (docs/cluster.md)
cluster: $(STAMP) system-deps
	$(PY) -m tidewire.dev.cluster up

## The chaos drill over that topology (kills a gateway, an orchestrator, a NATS node, the Redis and Postgres primaries)
chaos-cluster: $(STAMP) system-deps
	$(PY) -m pytest -q -m cluster tests/chaos/test_cluster_chaos.py tests/integration/test_redis_connect.py

## The container image (tidewire:0.1.0) built with podman from a base made here by debootstrap
## (no registry needed; docs/deployment.md), and the services started from it for one checked turn.
image: image-deps
	bash deploy/image/build.sh

test-image: $(STAMP) image-deps
	$(PY) -m pytest -q -m image tests/image

## Debian's podman, runc (crun cannot start containers on a hybrid-cgroup host) and debootstrap.
image-deps:
	@command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 || ( (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null 2>&1)) || echo "podman not installed: the image test will be skipped" )

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

## The Vercel AI SDK test client (clients/node, versions locked); skipped with a note when npm is missing.
node-deps:
	@command -v npm >/dev/null 2>&1 && (cd clients/node && [ -d node_modules/ai ] || npm ci --no-audit --no-fund --loglevel=error) || echo "npm not found: the AI SDK client test will be skipped"

## Debian's haproxy for the clustered topology (installed like chromium, when root and apt-get exist).
system-deps:
	@command -v haproxy >/dev/null 2>&1 || ( (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null 2>&1)) || echo "haproxy not installed: the cluster tests will say so" )

clean:
	rm -rf $(VENV) .tidewire .pytest_cache .mypy_cache .ruff_cache
