# sip700 container image.
#   docker build -t sip700 .          (or: podman build --format docker -t sip700 .)
#   docker run --rm -p 5060:5060/udp -p 5060:5060/tcp -p 5061-5064:5061-5064/udp \
#     -e SIP700_ADVERTISE=<host address> -e SIP700_TRUSTED_PEERS=10.0.0.0/8 \
#     -e SIP700_GATEWAY=sip:10.0.0.5:5060 -e SIP700_DIALOG_KEY=$(openssl rand -base64 32) sip700
# The built-in config (deploy/container.yaml) listens on every address and takes the site's
# values from the environment; mount your own at /etc/sip700 to replace it. Any base with
# python3 (3.11+) and its venv module works: BASE defaults to the official Python image;
# scripts/container-smoke builds with a Debian root filesystem made by mmdebstrap instead.
ARG BASE=python:3.11-slim

# ---- build: a virtual environment with the locked dependencies, then the package ----------------
FROM ${BASE} AS build
# pip trusts the system's CA store (a base made with the site's CAs added) rather than its
# own; PIP_INDEX_URL may name the site's package index (build arguments reach RUN's environment)
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_INDEX_URL
RUN python3 -m venv /opt/sip700
# the dependencies first, from the lock file alone: editing the code does not reinstall them
COPY deploy/constraints.txt /tmp/constraints.txt
RUN /opt/sip700/bin/pip install --no-cache-dir --disable-pip-version-check \
        -r /tmp/constraints.txt
# the compiled build (COMPILED=1, the default): the per-message modules compiled with mypyc,
# about 1.5x the calls a core carries. The compiler (a C compiler, Python's headers, mypy at its
# pinned version) lives in this stage only; COMPILED=0 ships the same code as plain Python.
ARG COMPILED=1
COPY deploy/build-constraints.txt /tmp/build-constraints.txt
RUN if [ "$COMPILED" = 1 ]; then \
        apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            gcc libc6-dev >/dev/null \
        && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
             || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                python3-dev >/dev/null; } \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv /opt/build \
        && /opt/build/bin/pip install --no-cache-dir --disable-pip-version-check \
            -r /tmp/build-constraints.txt; \
    fi
COPY pyproject.toml README.md /src/
COPY proxy /src/proxy
COPY scripts/build-compiled scripts/bench_core.py /src/scripts/
# a regular (not editable) install: the code (and the compiled modules, package data) lands in
# the venv's site-packages; the sources, build/ and the egg-info stay behind in this stage. The
# extensions are touched last: a source newer than its extension would not be used
# (proxy/compiled.py), and the install writes files in its own order. The build sees the
# runtime dependencies (their types) through PYTHONPATH.
RUN if [ "$COMPILED" = 1 ]; then cd /src \
        && PYTHONPATH="$(echo /opt/sip700/lib/python3*/site-packages)" \
           /opt/build/bin/python scripts/build-compiled; fi \
    && /opt/sip700/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /src \
    && /opt/sip700/bin/python -m compileall -q /opt/sip700/lib \
    && find /opt/sip700/lib -name '*.so' -path '*/proxy/*' -exec touch {} + \
    && /opt/sip700/bin/sip700 --version \
    && rm -rf /opt/sip700/bin/pip* /opt/sip700/lib/python3*/site-packages/pip*

# ---- runtime: the venv (root-owned, read-only for the service user) and a config --------------
FROM ${BASE}
RUN useradd --system --uid 700 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sip700
COPY --from=build /opt/sip700 /opt/sip700
COPY deploy/container.yaml /etc/sip700/proxy.yaml
COPY config/bindings.yaml /etc/sip700/bindings.yaml
ENV PATH=/opt/sip700/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    SIP700_RUNTIME_DIR=/tmp/sip700
USER sip700
WORKDIR /tmp
EXPOSE 5060/udp 5060/tcp 9090/tcp
# every worker's /readyz (config loaded, store reachable, a gateway up, not draining)
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sip700", "health", "--config", "/etc/sip700/proxy.yaml"]
# SIGTERM drains (shutdown.drain_s): give `docker stop -t` / stop_grace_period more than that
STOPSIGNAL SIGTERM
ENTRYPOINT ["sip700"]
CMD ["run", "--config", "/etc/sip700/proxy.yaml"]
