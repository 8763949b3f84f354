# One image for the fedkube operator, FL server and job-cell sidecar:
#   fedkube operator | fedkube server | fedkube sidecar
# It has no torch: those three never import it. Trainer images are built
# separately (see docs/kubernetes.md, "Trainer images").
#
#   docker build -t ghcr.io/fedkube/fedkube:0.1.0.dev0 .

FROM python:3.11-slim AS build
WORKDIR /src
# Only what the package build reads, so editing tests or docs does not bust the cache.
COPY pyproject.toml README.md ./
COPY fedkube ./fedkube
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[operator,dp]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed non-root uid/gid, matching the chart's securityContext (runAsUser 10001).
RUN groupadd --gid 10001 fedkube \
 && useradd --uid 10001 --gid 10001 --home-dir /home/fedkube --create-home --shell /usr/sbin/nologin fedkube
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "fedkube[operator,dp]" \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /home/fedkube
# gRPC (server), HTTP status/health, Prometheus metrics: the defaults in fedkube/envvars.py.
EXPOSE 7070 8080 9090
ENTRYPOINT ["fedkube"]
CMD ["--help"]
