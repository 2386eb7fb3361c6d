# syntax=docker/dockerfile:1
#
# visionflow CPU image: ghcr.io/visionflow/visionflow:<version> (visionflow.CPU_IMAGE).
# Runs the configure, prepare, evaluate, export, quantize and register components, and later
# serving (ONNX Runtime). No CUDA: torch and torchvision are PyTorch's CPU builds.
#
# Build from the repository root (`make images`):
#   docker buildx build -f images/cpu.Dockerfile \
#     --build-arg VISIONFLOW_VERSION=0.1.0 --build-arg VISIONFLOW_GIT_COMMIT=$(git rev-parse HEAD) \
#     -t ghcr.io/visionflow/visionflow:0.1.0 .

# ---- builder: a venv at /opt/venv with visionflow and its locked dependencies ----------------
# The same Python (3.11.17) as images/train.Dockerfile; the lock is resolved for 3.11.
FROM python:3.11.17-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
# pip and python below are the venv's, called by name so that hadolint checks every pip install.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch and torchvision from PyTorch's CPU index, alone (--no-deps): that index is trusted for
# these two only, and PyPI's Linux wheels of the same versions are CUDA 13 builds that pull several
# GB of nvidia-* wheels. The lock pins torch==2.14.1, and under PEP 440 a specifier without a local
# label ignores the candidate's label, so the installed 2.14.1+cpu satisfies it: the next step keeps
# it and installs only its dependencies, from PyPI, under the lock. Keep these equal to the lock
# (tests/unit/test_images.py checks).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}+cpu" "torchvision==${TORCHVISION_VERSION}+cpu"

# The dependencies before the code, so that a code change reuses this layer.
WORKDIR /src
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -c requirements.lock -r /tmp/requirements.txt

# visionflow itself, as a wheel (configs inside it), not an editable install. pip check proves the
# CPU torch satisfies every requirement; a VISIONFLOW_VERSION that disagrees with the wheel fails.
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

# ---- final: the venv on the same base (its python links to /usr/local/bin), no build tools ---
FROM python:3.11.17-slim-bookworm

# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --gid 10001 visionflow \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/visionflow \
        --shell /usr/sbin/nologin visionflow

# Root-owned and read-only to the user: a step cannot change the code it runs.
COPY --from=builder /opt/venv /opt/venv

# VISIONFLOW_HOME is visionflow's working directory (runs, caches, local MLflow), writable by the
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
LABEL org.opencontainers.image.title="visionflow" \
      org.opencontainers.image.description="visionflow pipeline steps and serving (CPU)" \
      org.opencontainers.image.version="${VISIONFLOW_VERSION}" \
      org.opencontainers.image.revision="${VISIONFLOW_GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/visionflow/visionflow" \
      org.opencontainers.image.licenses="Apache-2.0"

# `docker run IMAGE <step> key=value ...`. KFP components and PyTorchJob pods set the container's
# command, which replaces the ENTRYPOINT, so this only serves people and args-only pod specs.
ENTRYPOINT ["visionflow"]
CMD ["--help"]
