# CPU image serving the bundled model on 0.0.0.0:8000 (OpenAI-compatible API).
#   docker build -t diffpo-serve .
#   docker run --rm -p 8000:8000 diffpo-serve
#   docker run --rm -p 8000:8000 -e DIFFPO_API_KEY=secret -v /models/mine:/model diffpo-serve --model /model
#   docker run --rm -p 8000:8000 diffpo-serve --compile --dtype bfloat16   # cheaper batched steps (measured on AVX-512)
# Settings are flags (appended to `docker run ... diffpo-serve`) or DIFFPO_* variables; see `--help`.
# `docker stop` sends SIGTERM: the server refuses new requests and finishes running ones for up to
# DIFFPO_DRAIN_TIMEOUT seconds, so give it as long: `docker stop -t 70`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DIFFPO_HOST=0.0.0.0 \
    DIFFPO_PORT=8000

WORKDIR /app

# a C++ compiler for `--compile` (torch.compile builds its CPU kernels with it at start-up)
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

# the CPU wheel first: a bare `torch` requirement would pull several GB of CUDA packages
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY diffpo_serve ./diffpo_serve
COPY training ./training
RUN pip install . \
    && groupadd --gid 1000 diffpo \
    && useradd --create-home --uid 1000 --gid 1000 diffpo

USER 1000:1000
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('DIFFPO_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["diffpo-serve"]
CMD []
