# HyTRec inference service (CPU). Build: docker build -t hytrec .   Run: see deploy/docker-compose.yml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HYTREC_HOST=0.0.0.0 \
    HYTREC_PORT=8000 \
    HYTREC_DATA_DIR=/data

WORKDIR /app
# CPU-only torch first, from PyTorch's own index (the default index would pull the CUDA build).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md requirements.lock ./
COPY hytrec ./hytrec
COPY model ./model
COPY state_store ./state_store
COPY service ./service
COPY training ./training
COPY benchmarks ./benchmarks
COPY loadtest ./loadtest
# The demo checkpoint ships inside the package (hytrec.demo) and is served by default; mount another
# checkpoint and set HYTREC_MODEL to serve it.
COPY models/demo ./models/demo
# The serving install: the base dependencies, pinned by the lock file (no training or dev extras).
RUN pip install -c requirements.lock .

RUN useradd --system --uid 10001 --home-dir /app hytrec && mkdir -p /data && chown hytrec /data
USER hytrec
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,os;urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"HYTREC_PORT\"]}/healthz')"
CMD ["hytrec", "serve"]
