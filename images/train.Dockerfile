# syntax=docker/dockerfile:1
#
# visionflow training image: ghcr.io/visionflow/visionflow-train:<version> (visionflow.TRAIN_IMAGE).
# Runs the KFP train component and the PyTorchJob pods (one process per GPU, NCCL).
#
# Build from the repository root (`make images`):
#   docker buildx build -f images/train.Dockerfile \
#     --build-arg VISIONFLOW_VERSION=0.1.0 --build-arg VISIONFLOW_GIT_COMMIT=$(git rev-parse HEAD) \
#     -t ghcr.io/visionflow/visionflow-train:0.1.0 .
#
# Why nvidia/cuda:13.0.2-base and not a cudnn-runtime or pytorch/pytorch image: PyPI's
# torch==2.14.1 is a CUDA 13.0 build (cu130) that brings its own CUDA runtime, cuBLAS, cuDNN,
# NCCL, ... as nvidia-* wheels (pinned in requirements.lock) and loads them from the venv. A
# cudnn-runtime base would add a second, unused CUDA/cuDNN of a different patch level (GBs, and a
# chance of loading the wrong one through LD_LIBRARY_PATH); pytorch/pytorch carries its own torch
# in conda, not the locked one. The base image adds only what the wheels cannot: the CUDA 13.0
# major version, NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES for the NVIDIA container
# toolkit (which mounts the host driver), and NVIDIA_REQUIRE_CUDA=cuda>=13.0, so a node whose
# driver is too old for cu130 refuses the pod at start instead of failing inside torch.
#
# Python 3.11.17 is uv's standalone build (relocatable, needs only glibc): Ubuntu 24.04 ships 3.12,
# while requirements.lock is resolved for 3.11 and the CPU image runs 3.11.17; one interpreter for
# every step of a pipeline. No apt packages are installed in either stage.

FROM ghcr.io/astral-sh/uv:0.13.7 AS uv

# ---- builder: Python, and a venv at /opt/venv with visionflow and its locked dependencies ----
FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS builder

COPY --from=uv /uv /usr/local/bin/uv
ARG PYTHON_VERSION=3.11.17
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN uv python install --no-bin "${PYTHON_VERSION}" \
    && "$(uv python find --managed-python "${PYTHON_VERSION}")" -m venv /opt/venv
# pip and python below are the venv's, called by name so that hadolint checks every pip install.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The dependencies before the code, so that a code change reuses this (multi-GB) layer. torch
# comes from PyPI: the cu130 build described above, with its nvidia-* wheels, all under the lock;
# the `gpu` extra adds NVML's bindings (GPU utilisation in the training telemetry).
WORKDIR /src
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['gpu'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c requirements.lock -r /tmp/requirements.txt

# visionflow itself, as a wheel (configs inside it), not an editable install; a VISIONFLOW_VERSION
# that disagrees with the wheel fails the build.
COPY README.md ./
COPY configs configs
COPY src src
ARG VISIONFLOW_VERSION=""
RUN pip wheel --no-deps --wheel-dir /tmp/dist . \
    && pip install -c requirements.lock /tmp/dist/visionflow-*.whl \
    && pip check \
    && built="$(python -c 'import importlib.metadata as m; print(m.version("visionflow"))')" \
    && if [ -n "${VISIONFLOW_VERSION}" ] && [ "${VISIONFLOW_VERSION}" != "${built}" ]; then \
        echo "VISIONFLOW_VERSION=${VISIONFLOW_VERSION} but the package is ${built}" >&2; exit 1; fi

# ---- final: the interpreter and the venv on the same base, no build tools ------------------
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --gid 10001 visionflow \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/visionflow \
        --shell /usr/sbin/nologin visionflow

# Root-owned and read-only to the user: a step cannot change the code it runs. The venv's python
# links into /opt/python, so both keep their builder paths.
COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

# VISIONFLOW_HOME is visionflow's working directory (runs, checkpoints, caches), writable by the
# user; the config's default workdir `.visionflow` resolves to the same place from WORKDIR.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HOME=/home/visionflow \
    VISIONFLOW_HOME=/home/visionflow/.visionflow
WORKDIR /home/visionflow
USER 10001:10001

# Last, so a new commit rebuilds only these metadata layers. register reads
# VISIONFLOW_GIT_COMMIT for the model's lineage.
ARG VISIONFLOW_VERSION=""
ARG VISIONFLOW_GIT_COMMIT=""
ENV VISIONFLOW_GIT_COMMIT=${VISIONFLOW_GIT_COMMIT}
LABEL org.opencontainers.image.title="visionflow-train" \
      org.opencontainers.image.description="visionflow training (CUDA 13.0, torch cu130)" \
      org.opencontainers.image.version="${VISIONFLOW_VERSION}" \
      org.opencontainers.image.revision="${VISIONFLOW_GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/visionflow/visionflow" \
      org.opencontainers.image.licenses="Apache-2.0"

# `docker run --gpus all IMAGE train key=value ...`. KFP components and PyTorchJob pods set the
# container's command, which replaces the ENTRYPOINT, so this only serves people and args-only
# pod specs.
ENTRYPOINT ["visionflow"]
CMD ["--help"]
