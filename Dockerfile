# syntax=docker/dockerfile:1.7
#
# One image for all three tidewire processes; pick one with the command:
#   docker run IMAGE                                  -> python -m gateway       (port 8080)
#   docker run IMAGE python -m orchestrator           -> health port 8081
#   docker run IMAGE python -m tool_workers           -> health port 8082
#
# Base image: pinned to the Python minor version and Debian release (python:3.11-slim-bookworm),
# without a digest. For reproducible production builds pass a digest-pinned reference:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
#
# No HEALTHCHECK: Kubernetes uses readiness/liveness probes, compose.yaml declares its own checks.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

############################
# build: wheel + virtualenv
############################
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Runtime dependencies first (cached layer while only source changes). pyproject's `dependencies`
# are the runtime ones; the embedded servers that `tidewire dev` and the suite use are the `dev`
# extra (tidewire/dev/), which the image leaves out: containers talk to real NATS, Postgres, Redis.
COPY pyproject.toml ./
# (python -c, not a heredoc: buildah 1.28 / podman 4.3, Debian bookworm's, do not parse RUN heredocs.)
RUN python -c 'import tomllib; \
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
open("/tmp/runtime-requirements.txt", "w").write("\n".join(deps) + "\n"); \
print("runtime requirements:", *deps, sep="\n  ")'
RUN pip install -r /tmp/runtime-requirements.txt

# The project itself, as a wheel, installed without dependencies (already resolved above).
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --no-deps /wheels/*.whl \
 && python -m compileall -q /opt/venv

############################
# runtime: venv + non-root
############################
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="tidewire" \
      org.opencontainers.image.description="tidewire gateway, orchestrator and tool workers (select with the command)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed numeric ids so Kubernetes `runAsNonRoot`/`runAsUser: 10001` can be verified.
RUN groupadd --system --gid 10001 tidewire \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin tidewire

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TIDEWIRE_HTTP_PORT=8080

WORKDIR /tmp
USER 10001:10001

# gateway HTTP/WebSocket/SSE, orchestrator health, tool-worker health
EXPOSE 8080 8081 8082

# The processes handle SIGTERM themselves (the gateway drains for TIDEWIRE_DRAIN_SECONDS and closes
# sockets with 1012). Run with an init (compose `init: true`) when PID 1 signal semantics matter.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "gateway"]
