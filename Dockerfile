# inferd: serves the ONNX models of a repository mounted at /models.
#   docker build -t inferd .
#   docker run -p 8001:8001 -p 8002:8002 -v $PWD/models:/models:ro inferd
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /opt/inferd
COPY pyproject.toml README.md ./
COPY server server
COPY client client
COPY loadtest loadtest
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin inferd

USER inferd
VOLUME ["/models"]
EXPOSE 8001 8002
ENV INFERD_MODEL_REPOSITORY=/models INFERD_HOST=0.0.0.0
# Fewer malloc arenas: memory freed by unloading a model goes back to the pool other threads
# use, instead of staying parked in per-thread arenas (RSS over 20 load/unload cycles: see
# docs/operations.md).
ENV MALLOC_ARENA_MAX=2
# SIGTERM drains: health NOT_SERVING, accepted requests answered, exit within the grace period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD ["inferd", "health", "--url", "127.0.0.1:8001"]
ENTRYPOINT ["inferd", "serve"]
