# authproxy container image.
#
#   docker build -t registry.example.com/authproxy:0.1.0 .
#   docker run --rm -p 8000:8000 \
#     -v "$PWD/authproxy.toml:/etc/authproxy/authproxy.toml:ro" registry.example.com/authproxy:0.1.0
#
# Building and pushing it for a cluster: docs/deploy.md, "The image".
#
# Two stages: "build" installs the pinned dependencies (requirements.lock, every
# file checked against its hash, wheels only) and authproxy itself into a
# virtual environment without pip; the final stage copies that environment onto
# a clean slim image and runs it as an unprivileged user. No compiler, no pip,
# no setuptools in the final image. Kubernetes probes /healthz and /readyz, so
# the image has no HEALTHCHECK.
#
# tests/test_deploy.py replays the "build" stage's steps in a fresh virtual
# environment and starts the ENTRYPOINT from it: keep the steps plain.
# For reproducible builds, pin the base image by digest (python:3.11-slim@sha256:...).

FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv --without-pip /opt/authproxy
COPY requirements.lock ./
RUN python -m pip --python /opt/authproxy/bin/python install \
        --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml ./
COPY authproxy/ ./authproxy/
RUN python -m pip --python /opt/authproxy/bin/python install --no-deps . \
    && python -m pip --python /opt/authproxy/bin/python check

FROM python:3.11-slim

# XDG_RUNTIME_DIR: gunicorn's control socket goes to /tmp (an emptyDir under a
# read-only root file system) instead of a home directory the user does not have.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_RUNTIME_DIR=/tmp \
    PATH=/opt/authproxy/bin:$PATH
RUN groupadd --system --gid 10001 authproxy \
    && useradd --system --uid 10001 --gid authproxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin authproxy
COPY --from=build /opt/authproxy /opt/authproxy
# ./authproxy.toml is read from here: mount the config at /etc/authproxy/authproxy.toml,
# or set the Go sidecar's variables (DASHBOARD_PROXY_URL, LISTEN_ADDRESS, DASHBOARD_TOKEN).
WORKDIR /etc/authproxy
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["authproxy"]
CMD ["serve"]
