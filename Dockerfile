# One image for the fedkube operator, FL server and job-cell sidecar:
#   fedkube operator | fedkube server | fedkube sidecar
# It has no torch: those three never import it. Trainer images are built
# separately (examples/*/Dockerfile, docs/kubernetes.md "Trainer images").
#
#   docker build -t ghcr.io/fedkube/fedkube:0.1.0.dev0 .
#   scripts/build-images.sh fedkube    (podman, no registry: a Debian base made with debootstrap)
#
# BASE is any image with Python >= 3.10, pip, groupadd and useradd on the PATH.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
WORKDIR /src
# The dependencies first, pinned with hashes (requirements/image.txt, `scripts/build-images.sh lock`), so
# their layer is reused while only fedkube's code changes.
COPY requirements/image.txt ./
RUN python -m pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r image.txt
# Only what the package build reads, so editing tests or docs does not bust the cache.
COPY pyproject.toml README.md ./
COPY fedkube ./fedkube
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The uid/gid every fedkube pod runs as (RUN_AS in fedkube/operator/builders.py, the chart's securityContext):
# one number, so files the image owns and files a pod writes belong to the same user.
RUN groupadd --gid 65532 fedkube \
 && useradd --uid 65532 --gid 65532 --home-dir /home/fedkube --create-home --shell /usr/sbin/nologin fedkube
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels "fedkube[operator,dp]" \
 && rm -rf /wheels
USER 65532:65532
WORKDIR /home/fedkube
# gRPC (server), bulk transfers (server), HTTP status/health, Prometheus metrics (server; 9091 for the
# sidecar, which shares its pod's network with the server-less trainer): the defaults in fedkube/envvars.py
# and fedkube/operator/builders.py.
EXPOSE 7070 8471 8080 9090 9091
ENTRYPOINT ["fedkube"]
CMD ["--help"]
