# HyTRec inference service (CPU). Build: docker build -t hytrec:0.2.0 .   Run: deploy/docker-compose.yml
# Two stages: the build stage installs the dependencies into a virtual environment before any code is copied
# (a code change re-installs nothing but the package), the runtime stage gets the environment and no build tools.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# CPU-only torch first, from PyTorch's own index (the default index would pull the CUDA build).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The serving dependencies (pyproject's base list and the otel extra, used only when an OTLP endpoint is set; no
# training or dev extras), pinned by the lock file.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['otel']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/requirements.txt
# Then the code (the demo checkpoint ships inside the package as hytrec.demo).
COPY README.md ./
COPY hytrec ./hytrec
COPY model ./model
COPY state_store ./state_store
COPY service ./service
COPY streams ./streams
COPY training ./training
COPY benchmarks ./benchmarks
COPY loadtest ./loadtest
COPY models/demo ./models/demo
RUN pip install --no-cache-dir --no-deps .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HYTREC_HOST=0.0.0.0 \
    HYTREC_PORT=8000 \
    HYTREC_DATA_DIR=/data
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 hytrec \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home hytrec \
    && mkdir -p /data && chown 10001:10001 /data
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"HYTREC_PORT\"]}/healthz', timeout=2)"]
CMD ["hytrec", "serve"]
