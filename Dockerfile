# smtpfleet node image.
#
#   docker build -t smtpfleet .
#   docker run --read-only --tmpfs /tmp -p 2525:2525 -p 9125:9125 \
#     -e SMTPFLEET_REDIS__URL=redis://redis:6379/0 smtpfleet
#
# Ports: 2525/tcp SMTP (inbound.listen), 9125/tcp HTTP (/metrics, /healthz, /readyz; http.listen).
# Runs as uid 10001 with a read-only root file system; only /tmp needs to be writable.
# The entrypoint is the `smtpfleet` CLI, so `docker run IMAGE status --redis URL` works too.
# Linted with hadolint (tests/integration/test_deploy.py); see docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/smtpfleet
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Core dependencies only: no Valkey binary and no test tools (those are the testing/dev extras).
RUN /opt/smtpfleet/bin/pip install --no-cache-dir . \
    && /opt/smtpfleet/bin/pip uninstall --yes pip \
    && /opt/smtpfleet/bin/python -m compileall -q /opt/smtpfleet

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="smtpfleet" \
      org.opencontainers.image.description="Active-active SMTP proxy node: durable accept into Redis streams, delivery over a relay pool" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 smtpfleet \
    && useradd --system --uid 10001 --gid smtpfleet --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin smtpfleet
COPY --from=build /opt/smtpfleet /opt/smtpfleet
COPY deploy/docker/smtpfleet.yaml /etc/smtpfleet/smtpfleet.yaml
COPY deploy/docker/healthcheck.py /opt/smtpfleet/healthcheck.py
# PYTHONDONTWRITEBYTECODE: the root file system is read-only (the bytecode is compiled above).
ENV PATH=/opt/smtpfleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    SMTPFLEET_CONFIG=/etc/smtpfleet/smtpfleet.yaml \
    SMTPFLEET_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 2525/tcp 9125/tcp
# Liveness: GET /healthz on the port http.listen names (read from the same config and env).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/smtpfleet/healthcheck.py"]
# SIGTERM drains: 421 to new sessions, work in flight finishes within node.drain_grace_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpfleet"]
CMD ["serve"]
