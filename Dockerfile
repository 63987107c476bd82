# meshca's container image: `meshca serve` and the admin commands, nothing else.
#
#   docker build -t meshca:0.1.0 .
#
# deploy/kubernetes/meshca.yaml runs it as UID/GID 10001 with a read-only root filesystem; the tag
# is the version in pyproject.toml. Envoy, OpenBao and etcd are not in it (the dev extra has them).

# Both stages on the same pinned base (the venv's python is the base image's /usr/local/bin/python3.11);
# add the digest (python:3.11.13-slim-bookworm@sha256:...) for byte-identical rebuilds.
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/meshca/.venv
WORKDIR /src
# The project alone (runtime dependencies, no extras): what .dockerignore lets through.
COPY pyproject.toml README.md ./
COPY meshca ./meshca
RUN /opt/meshca/.venv/bin/pip install --no-cache-dir .

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="meshca" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Secrets and certificate distribution for Envoy service meshes"
RUN groupadd --system --gid 10001 meshca \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin meshca
COPY --from=build /opt/meshca/.venv /opt/meshca/.venv
ENV PATH=/opt/meshca/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 15010 15011
ENTRYPOINT ["/opt/meshca/.venv/bin/meshca"]
CMD ["serve", "--config", "/etc/meshca/meshca.yaml"]
