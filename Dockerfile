# syntax=docker/dockerfile:1
# Keel as an image: `docker build -t keel .`; `docker run -p 8080:8080 -e KEEL_MASTER_KEY=… keel`.
# Stage 1 compiles llama.cpp (portable CPU flags, as the Makefile: a native build dies on other CPUs)
# and hnswlib into a virtual environment; stage 2 copies only that environment onto a slim base.

FROM python:3.11-slim-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/keel/venv \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HNSWLIB_NO_NATIVE=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF"
RUN python -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
RUN pip install "pip==25.3" "wheel==0.45.1" "setuptools==80.9.0" \
    && pip install "llama-cpp-python==0.3.36"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY keel ./keel
RUN pip install . \
    && python -c "import llama_cpp, sys; info = llama_cpp.llama_print_system_info().decode(); \
sys.exit('AMX_INT8 = 1' in info or 'OPENMP = 1' in info)"

FROM python:3.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="keel" \
      org.opencontainers.image.description="A self-hosted AI operating layer"
RUN groupadd --system --gid 10001 keel \
    && useradd --system --uid 10001 --gid keel --home-dir /var/lib/keel --create-home --shell /usr/sbin/nologin keel
COPY --from=build /opt/keel/venv /opt/keel/venv
ENV PATH="/opt/keel/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    KEEL_HOST=0.0.0.0 \
    KEEL_PORT=8080 \
    KEEL_DATA_DIR=/var/lib/keel \
    MALLOC_MMAP_THRESHOLD_=131072
WORKDIR /var/lib/keel
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["keel"]
CMD ["serve"]
