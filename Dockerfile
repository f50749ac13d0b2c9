# One image for all six services; each Deployment picks its service with `python -m services.<name>`.
#   docker build -t openclaw-parallel:0.1.0 .
# Multi-stage: the build stage installs requirements.lock (every dependency and the build backend, pinned and
# hash-checked; `make lock` writes it), then builds the package itself with that backend (no test/dev extras) into
# a venv; the runtime stage
# copies only that venv and runs as an unprivileged numeric user (runAsNonRoot can verify it) on a
# read-only root filesystem (no .pyc written at run time; /tmp is an emptyDir in the manifests).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/openclaw
WORKDIR /src
COPY requirements.lock ./
RUN /opt/openclaw/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
RUN /opt/openclaw/bin/pip install --no-deps --no-build-isolation . \
 && /opt/openclaw/bin/pip check \
 && /opt/openclaw/bin/python -m compileall -q /opt/openclaw

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 openclaw \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin openclaw
COPY --from=build /opt/openclaw /opt/openclaw
ENV PATH=/opt/openclaw/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080 9101 9102 9103 9104 9105
# The gateway by default; the manifests set the command of every service explicitly.
CMD ["python", "-m", "services.gateway"]
