# syntax=docker/dockerfile:1
# The training image: `pip install '.[teacher,train]'`, with torch from PyTorch's CPU wheels by default.
# For a CUDA build:  docker build -f docker/trainer.Dockerfile \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t sceneprint-trainer .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/sceneprint/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# The same uid as the service image's user, so that both can use the shared models volume.
RUN python -m venv /opt/sceneprint \
    && groupadd --system --gid 10001 sceneprint \
    && useradd --system --uid 10001 --gid sceneprint --create-home --home-dir /home/sceneprint \
       --shell /usr/sbin/nologin sceneprint
WORKDIR /src
# The dependencies first (torch and torchaudio, at pyproject's pins, from TORCH_INDEX_URL), then the code.
COPY pyproject.toml docker/requirements.py ./
RUN python requirements.py teacher train > requirements.txt \
    && python requirements.py --only torch,torchaudio teacher train > torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r torch.txt \
    && pip install -r requirements.txt
COPY . .
# DL3013 asks for pinned versions: this is the project itself, whose dependencies pyproject.toml pins.
# hadolint ignore=DL3013
RUN pip install '.[teacher,train]' \
    && install -d -o sceneprint -g sceneprint /models /src/runs
USER 10001:10001
ENTRYPOINT ["sceneprint"]
CMD ["--help"]
