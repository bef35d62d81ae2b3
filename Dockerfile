# oodlab image: the code baked in (RayCluster/RayJob/RayService and the MLflow server run it).
#   CPU:  docker build -t oodlab:0.1.0 .
#   GPU:  docker build -t oodlab:0.1.0-gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Runs as the non-root user 1000 (the pods' securityContext asks for runAsNonRoot).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

# wget: KubeRay's health probes; libgomp1: torch CPU kernels
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --create-home --shell /bin/bash ray

WORKDIR /app
# dependencies first (cached layer): the pinned set from constraints.txt, torch from TORCH_INDEX,
# psycopg2 for the MLflow server's PostgreSQL backend store
COPY pyproject.toml constraints.txt README.md ./
COPY platform ./platform
RUN pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt . psycopg2-binary==2.9.10

COPY jobs ./jobs
COPY search_spaces ./search_spaces
RUN chown -R 1000:1000 /app
USER 1000
ENV HOME=/home/ray
CMD ["oodlab", "--help"]
