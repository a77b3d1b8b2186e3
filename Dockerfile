# ignore-proxy: a Matrix client-server reverse proxy that enforces "ignore user" semantics.
#
#   docker build -t ignore-proxy .
#   docker run -d --name ignore-proxy -p 127.0.0.1:8010:8010 \
#     -e IGNORE_PROXY_UPSTREAM=http://homeserver:8008 ignore-proxy
#
# Configured entirely by IGNORE_PROXY_* environment variables, or by a TOML file mounted
# into the container and named by IGNORE_PROXY_CONFIG, e.g.
#   -v ./ignore-proxy.toml:/etc/ignore-proxy/ignore-proxy.toml:ro \
#   -e IGNORE_PROXY_CONFIG=/etc/ignore-proxy/ignore-proxy.toml
# (environment variables win over the file; see config/ignore-proxy.toml for every key).
#
# tests/test_docker.py checks this file's invariants and replays its build and install
# steps without a Docker engine: keep every RUN step runnable outside a container too.

# Both stages start from the same base. For builds that never change under you, pin it by
# digest in both FROM lines: python:3.12-slim-bookworm@sha256:<digest>, the digest from
# `docker buildx imagetools inspect python:3.12-slim-bookworm` (update it with the base).
FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY ignore_proxy ./ignore_proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The dependencies exactly as locked (versions and file hashes), then the proxy alone.
COPY requirements.lock /tmp/
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/requirements.lock

# All interfaces inside the container; publish the port on the host as you need it.
# 8010 clashes with none of Synapse/Dendrite (8008), Conduit/continuwuity (6167),
# federation (8448) or pantalaimon and the sliding-sync proxy (8009).
ENV IGNORE_PROXY_LISTEN=0.0.0.0:8010
EXPOSE 8010
# The Prometheus listener is off unless IGNORE_PROXY_METRICS_LISTEN is set (e.g.
# 0.0.0.0:9010); publish that port only to your monitoring network, never through nginx.

# A fixed uid that is not root, with no home and no files of its own. (The base image's
# shell stays; nothing here needs it.)
USER 10010:10010
WORKDIR /

STOPSIGNAL SIGTERM
# Slim images have no curl: the program checks itself (GET /_ignore_proxy/health/live,
# ignoring proxy variables; exit 0 or 1, never Docker's reserved 2). `serve --listen` in
# `docker run` moves the check along: the server notes its address in /tmp.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["ignore-proxy", "healthcheck"]
ENTRYPOINT ["ignore-proxy"]
CMD ["serve"]
