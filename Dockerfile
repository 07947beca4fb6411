# The distillflow image: the `distill` CLI, the Prefect worker and the trainer.
#
#   docker build -t distillflow .                                  # torch 2.13.0 from PyPI (CUDA build on x86_64)
#   docker build -t distillflow --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only, smaller
#   docker build -t distillflow --build-arg TORCH=torch==2.13.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .                       # a given CUDA build
#
# torch is installed first, from the index you choose, so that `pip install .` (which only
# asks for torch>=2.4) keeps it instead of resolving another build.
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions

# A compiler for DeepSpeed's just-in-time CPU ops; curl for health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential curl \
    && rm -rf /var/lib/apt/lists/*

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH"; \
    fi

WORKDIR /app
COPY . .
# torch>=2.4 is already satisfied, so pip keeps the build installed above. Editable, so
# the code finds configs/ and prompts/ under /app.
RUN pip install -e . && python -c "import distillflow, torch; print('torch', torch.__version__)"

RUN useradd --create-home --uid 1000 distill && mkdir -p /app/data /app/runs /app/.cache \
    && chown -R distill /app
USER distill

CMD ["distill", "--help"]
