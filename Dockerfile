# loco in a container: the `loco` command, nothing else.
#
#   docker build -t loco:cpu .                                  # CPU (torch's CPU wheels)
#   docker build -t loco:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA build differs only in the torch wheel (it brings its own CUDA libraries); run it
# with the NVIDIA container toolkit (`docker run --gpus all`, or the compose file's
# `deploy.resources` block) and --set node.device=cuda.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /opt/loco
# torch first, from its own index: the largest layer, cached across source changes
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY node node
COPY protocols protocols
COPY optim optim
RUN pip install --no-cache-dir . && loco --version

# a node's --out lives here (mount a volume: checkpoints, identity and metrics survive restarts)
VOLUME /runs
# ZeroMQ, DHT and /metrics ports that the compose file fixes (node.port, node.dht_port, node.metrics_port)
EXPOSE 5555 5556 9400
ENTRYPOINT ["loco"]
CMD ["--help"]
