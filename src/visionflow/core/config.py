"""Config composition and validation.

Configs are Hydra's: `configs/config.yaml` plus groups, composed with command-line overrides
on top of the typed schema below, so an unknown key or a value of the wrong type fails here,
before any work, with the key named. The schema holds every default; a group's YAML file sets
only what its option changes. `_target_` blocks (optimizer, scheduler, Lightning callbacks) are
checked against their target's signature (`check_targets`).
"""

from __future__ import annotations

import difflib
import importlib.resources
import inspect
import os
import pydoc
import re
import secrets
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to do."""


@dataclass
class DataConfig:
    name: str = "shapes"
    root: str | None = None  # imagefolder: a directory or s3://bucket/prefix
    test_root: str | None = None
    image_size: int = 32
    num_samples: int = 6000  # shapes
    num_classes: int = 5  # shapes
    max_per_class: int | None = None  # imagefolder: subsample each class
    max_samples: int | None = None  # cifar10/100, coco: keep this many training samples (by seed)
    annotations: str | None = None  # coco: the instances JSON for `root` (local or s3://)
    test_annotations: str | None = None  # coco: the instances JSON for `test_root`
    download: bool = False  # cifar10/cifar100: fetch the archive into `root` if it is missing
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_bad_fraction: float = 0.05  # prepare fails when more of the source is unreadable
    # prepare rejects a larger image from its header, before decoding it (decompression bombs)
    max_image_pixels: int = 40_000_000
    samples_per_shard: int = 2000
    batch_size: int = 128
    num_workers: int = 0
    # none: decode images in DataLoader workers, every epoch (the shard path). memory | gpu:
    # decode the shards once into a uint8 tensor (on the GPU for `gpu` when CUDA is there) and
    # augment whole batches on that device (see vision/data/cached.py).
    cache: str = "none"


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 6
    log_every_n_steps: int = 10
    deterministic: bool = False
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None  # norm (Lightning's default) | value
    accumulate_grad_batches: int = 1
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes (DDP)
    limit_train_batches: Any = None
    limit_val_batches: Any = None


@dataclass
class OptimConfig:
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    label_smoothing: float = 0.0
    # Learning rate of normalisation layers' parameters as a multiple of the optimizer's; their
    # weight decay is divided by it, so it stays the same per step.
    norm_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    """How the training step runs the network (not what it optimises: that is `optim`)."""

    channels_last: bool = False  # NHWC memory layout for the network and its inputs
    compile: bool = False  # torch.compile the network (the first steps pay for compilation)
    # Recompute block activations in the backward pass: less memory, about a third more time.
    gradient_checkpointing: bool = False
    # last.ckpt every this many optimizer steps as well as at epoch ends (0: epoch ends only);
    # a killed run, rerun with the same run_id, continues from there, mid-epoch.
    checkpoint_every_n_steps: int = 100


@dataclass
class TransformsConfig:
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    # Whole-batch transforms on training batches (MixUp, CutMix): classification only.
    batch: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StorageConfig:
    """Where artifacts (datasets, checkpoints, models) go: a local directory or s3://bucket."""

    root: str = "${workdir}/artifacts"
    endpoint: str | None = None  # an S3 API's URL (MinIO); None: AWS's


@dataclass
class TrackingConfig:
    """MLflow: by default a sqlite store under the working directory (`make mlflow-ui`)."""

    uri: str = "sqlite:///${workdir}/mlflow.db"
    experiment: str = "visionflow"


@dataclass
class EvaluateConfig:
    # The quality gate on the task's main test metric (classification accuracy, detection
    # mAP@.5, segmentation mIoU): below it the model is registered, never champion.
    min_score: float = 0.9
    # false switches the quality gate off, and says so on the run and the model version: every
    # model with a finite score may then become champion (smoke runs and tests only)
    gate: bool = True


@dataclass
class OptimizeConfig:
    """The optional step between train and evaluate/export: `optimize=prune` (see
    steps/optimize.py); `none` (the default) skips it."""

    method: str = "none"  # none | prune
    # prune: keep this share of the network's multiply-accumulates (MACs), by removing whole
    # channels of least L2 norm; the classifier's output layer keeps its classes.
    target_macs: float = 0.5
    epochs: int = 3  # prune: fine-tuning epochs of the pruned network, with the run's optim
    bench_repeats: int = 20  # timed batches of 64 per network (before, after)


@dataclass
class ExportConfig:
    """Exported files against PyTorch on test images."""

    # Max |difference| of the outputs (logits; detection: scores, and boxes as a share of the
    # image side) and the share of decisions that agree (top-1 class; per-pixel class;
    # detection: confident detections per image).
    atol: float = 1e-4
    min_agreement: float = 0.999
    max_samples: int = 2000  # test images for the parity checks (export's; int8 against fp32)


@dataclass
class QuantizeConfig:
    # int8 that loses more than this many points of the task's main metric (x100) is rejected:
    # no int8 file, and the run goes on with fp32. required: true fails the run instead.
    max_accuracy_drop: float = 1.0
    required: bool = False
    calibration_samples: int = 512  # training images used to calibrate activations
    bench_repeats: int = 20  # timed runs per model and batch size


@dataclass
class RegisterConfig:
    model_name: str | None = (
        None  # default: visionflow-<data.name>, plus -detection / -segmentation
    )


@dataclass
class ClusterConfig:
    """Where and how training runs on Kubernetes: a Kubeflow Training Operator PyTorchJob
    (kubeflow.org/v1) or a Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1)."""

    # auto: a cluster job only inside the compiled pipeline's train step ($VISIONFLOW_KFP_STEP
    # and $KUBERNETES_SERVICE_HOST both set), in-process elsewhere | local | pytorchjob (a
    # cluster job of the kind `api` selects, from anywhere with a kubeconfig)
    launcher: str = "auto"
    api: str = "pytorchjob"  # pytorchjob | trainjob
    runtime: str = "torch-distributed"  # trainjob: the (torch) ClusterTrainingRuntime
    namespace: str | None = None  # None: the launching pod's own (else the kubeconfig's)
    image: str | None = None  # default: visionflow.TRAIN_IMAGE
    nodes: int = 1  # pods: one Master and nodes-1 Workers
    gpus_per_node: int = 0  # nvidia.com/gpu per pod and processes per pod (0: one CPU process)
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "8Gi"  # memory-backed /dev/shm for DataLoader workers and NCCL
    # Kubernetes fields, passed through as given (None: not set), e.g.
    # 'cluster.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}'
    node_selector: Any = None
    tolerations: Any = None
    affinity: Any = None
    backoff_limit: int = 3  # pod restarts (preemption, a lost node) before the job fails
    active_deadline_seconds: int = 86400
    ttl_seconds_after_finished: int | None = 3600  # pytorchjob: then the job goes (None: kept)
    pending_timeout_s: int = 1800  # pods not all running this long: delete the job, fail (0: off)
    clean_pod_policy: str = "Running"  # None | Running | All
    restart_policy: str = "OnFailure"
    s3_secret: str = "visionflow-minio"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    mlflow_secret: str | None = (
        None  # optional keys MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
    )
    service_account: str | None = None  # for the pods; they need no Kubernetes API access
    port: int = 23456
    # The ConfigMap with the site config (key cluster.yaml) that the training pods mount, as the
    # pipeline's steps do (None: the pods get none; their config is the command line's alone).
    site_config_map: str | None = None


@dataclass
class ServeConfig:
    """`visionflow serve`: the HTTP service over registered versions (serving/app.py)."""

    host: str = "127.0.0.1"
    port: int = 8080
    variant: str = "auto"  # auto (int8 only where timed faster here at start) | fp32 | int8
    threads: int | None = None  # ONNX Runtime intra-op threads per version (None: the cores)
    max_batch_size: int = 32  # images coalesced into one model call
    # How long the first image of a batch waits for company. 0: none; what queues while the
    # model runs forms the next batch, so batches grow with load and a lone request waits for
    # nothing.
    max_delay_ms: float = 0.0
    queue_size: int = 512  # images waiting per version; past it, 503 with Retry-After
    timeout_s: float = 10.0  # a request not answered by then gets 504
    refresh_s: float = 30.0  # aliases are resolved again this often (0: only at start)
    # Traffic by alias and weight, e.g. {champion: 0.9, challenger: 0.1}; sticky per
    # X-Visionflow-Key. None: everything to MODEL's version. (Typed Any: Hydra cannot merge a
    # `{...}` override into a typed dict that defaults to None; serving checks the weights.)
    split: Any = None
    shadow: str | None = None  # an alias that gets a copy of each request; answers are MODEL's
    max_versions: int = 4  # versions named by number kept loaded (least recently used go)
    top_k: int = 5  # classification: labels per image in /v1 answers
    max_body_mb: float = 64.0  # as Triton's default; larger bodies get 413 unread
    max_pixels: int = 40_000_000  # per image, checked before decoding (decompression bombs)
    max_images: int = 64  # files per /v1 request


@dataclass
class PredictConfig:
    """`visionflow predict`: batch inference into Parquet (steps/predict.py)."""

    model: str = ""  # name@alias, name/version or name
    input: str = ""  # a local directory or an s3:// prefix of images (searched recursively)
    output: str | None = None  # default: predictions/<run_id>/ in the artifact store
    shard_size: int = 1000  # images per Parquet file; a finished shard is never redone
    batch_size: int = 64
    top_k: int = 5
    max_bad_fraction: float = 0.05  # undecodable images past this share fail the step
    variant: str = "auto"  # as serve.variant


@dataclass
class SweepConfig:
    """The sweep a run belongs to (`visionflow pipeline run|submit -m`); set by the sweep."""

    id: str | None = None  # its runs are `<id>-<n>`, grouped under one MLflow parent run


@dataclass
class Config:
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # A run's identity. Rerunning a step with the same id resumes it (training restarts from
    # the last checkpoint). None: each run gets a new id.
    run_id: str | None = None
    seed: int = 42
    # Local working directory: caches, and the default artifact store and MLflow database.
    workdir: str = "${oc.env:VISIONFLOW_HOME,.visionflow}"


def config_dir() -> Path:
    """Where the configs are: $VISIONFLOW_CONFIG_DIR, the checkout, or the installed package."""
    if env := os.environ.get("VISIONFLOW_CONFIG_DIR"):
        return Path(env)
    checkout = Path(__file__).resolve().parents[3] / "configs"  # src/visionflow/core/config.py
    if (checkout / "config.yaml").is_file():
        return checkout
    packaged = Path(str(importlib.resources.files("visionflow"))) / "configs"
    if (packaged / "config.yaml").is_file():
        return packaged
    raise ConfigError("visionflow's configs are missing: set VISIONFLOW_CONFIG_DIR")


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


SCHEMA = "visionflow_schema"  # the first entry of config.yaml's defaults list
ConfigStore.instance().store(name=SCHEMA, node=Config)


SITE_ENV = "VISIONFLOW_SITE_CONFIG"


def site_overrides() -> list[str]:
    """The site config named by $VISIONFLOW_SITE_CONFIG, as overrides that put it in the defaults.

    A site config is a Hydra config file `<dir>/site/<name>.yaml` (`# @package _global_`) that an
    operator, not a run, writes: the Helm release's cluster config (mounted into every step and
    training pod), or the file `visionflow pipeline run` writes for its steps. It comes after the
    experiment in the defaults list; command-line overrides still win over it.
    """
    value = os.environ.get(SITE_ENV)
    if not value:
        return []
    path = Path(value)
    if path.parent.name != "site" or path.suffix != ".yaml":
        raise ConfigError(f"${SITE_ENV} must name a file <dir>/site/<name>.yaml, got {value!r}")
    if not path.is_file():
        raise ConfigError(
            f"${SITE_ENV} names {value}, which does not exist: on a cluster, the release's "
            "config ConfigMap is not mounted there (check the pipeline and the chart's names)"
        )
    return [f"hydra.searchpath=[file://{path.parent.parent}]", f"+site={path.stem}"]


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config with Hydra overrides, validate it, and resolve every interpolation.

    The typed schema is the base of the composition, so every key it defines can be overridden
    and Hydra itself rejects unknown keys and wrong types. The site config, if any
    (`site_overrides`), is part of the composition. Raises ConfigError naming the key.
    """
    site = site_overrides()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*site, *overrides])
        # Again against the schema: `+key=value` adds keys that composition lets through.
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
        # Steps run in other processes (KFP tasks, pods): make local paths independent of cwd.
        cfg.workdir = str(Path(cfg.workdir).expanduser().resolve())
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_paragraph(err)) from None
    check_targets(to_container(cfg))
    if not cfg.run_id:
        cfg.run_id = new_run_id()
    if not _RUN_ID.fullmatch(cfg.run_id):
        raise ConfigError(
            f"run_id {cfg.run_id!r} refused: it names paths in the store, so it must be one plain "
            "name (letters, digits, '.', '_' and '-', starting with a letter or digit, at most "
            "128 characters)"
        )
    return cfg


def check_targets(node: Any, where: str = "") -> None:
    """Check every `_target_` block in a config tree, nested ones too, against its target.

    The target is imported by its dotted path, as `hydra.utils.instantiate` will, and the
    block's keys must be keyword parameters of it, so that a misspelt key fails here rather than
    when training starts. Keys starting with `_` are Hydra's (`_partial_`, `_args_`, ...).
    """
    if isinstance(node, dict):
        if "_target_" in node:
            path = node["_target_"]
            try:  # pydoc's, not hydra.utils.get_object, which also logs the failure
                target = pydoc.locate(path)
            except pydoc.ErrorDuringImport as err:
                raise ConfigError(
                    f"{where}._target_={path!r} fails to import: {err.value}"
                ) from None
            if target is None:
                raise ConfigError(
                    f"{where}._target_={path!r} cannot be imported: no such module or name"
                )
            args = {k: v for k, v in node.items() if not str(k).startswith("_")}
            check_call(target, args, where, path)
        for key, value in node.items():
            check_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{where}[{i}]")


def check_call(fn: Callable, kwargs: dict[str, Any], where: str, what: str) -> None:
    """Raise ConfigError naming `where.key` for the first keyword `fn` does not take, or a value
    that its annotation rules out.

    Callables that take **kwargs, or whose signature cannot be read (some builtins), accept any
    key: what they reject shows only when they are called. Values are checked only against
    annotations made of bool, int, float, str, None and Literal (`fits`).
    """
    params: dict[str, inspect.Parameter] = {}
    # A class whose __init__ passes **kwargs on (to its base's __init__) takes what they take.
    inits = (
        [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if isinstance(fn, type) else [fn]
    )
    takes_any = True
    for init in inits:
        own = _parameters(init)
        if own is None:
            return
        params = {**own, **params}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            takes_any = False
            break
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [name for name, p in params.items() if p.kind in kinds and name != "self"]
    for key, value in kwargs.items():
        if key not in accepted:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, accepted)
            hint = (
                f"did you mean {' or '.join(close)}?"
                if close
                else f"it takes: {', '.join(accepted)}"
            )
            raise ConfigError(f"{where}.{key} is not a parameter of {what}; {hint}")
        if not fits(value, want := params[key].annotation):
            raise ConfigError(f"{where}.{key}={value!r}: {what} takes {_type_name(want)} there")


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    """`fn`'s parameters, or None where its signature cannot be read (some builtins)."""
    try:
        return dict(inspect.signature(fn, eval_str=True).parameters)
    except Exception:  # annotations that name what only type checkers see
        try:
            return dict(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            return None


_SCALARS = (bool, int, float, str)


def fits(value: Any, want: Any) -> bool:
    """Whether a config value can be passed where `want` is annotated.

    Only bool, int, float (an int fits), str, None and Literal, alone or in a union, are
    checked; a union with any other member, and every other annotation, admits anything.
    """
    if typing.get_origin(want) in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(want))
    if typing.get_origin(want) is typing.Literal:
        return value in typing.get_args(want)
    if want is None or want is type(None):
        return value is None
    if want not in _SCALARS:
        return True
    if isinstance(value, bool):
        return want is bool
    return isinstance(value, int | float) if want is float else isinstance(value, want)


def _type_name(want: Any) -> str:
    return want.__name__ if isinstance(want, type) else str(want).replace("typing.", "")


def _one_paragraph(err: Exception) -> str:
    text = str(err)
    if err.__cause__ is not None:  # Hydra wraps the message that names the key and value
        text += "\n" + str(err.__cause__)
    text = text.split("Config search path")[0]  # Hydra appends its search path: noise here
    lines = [ln.strip().rstrip(":") for ln in text.splitlines() if ln.strip()]
    return "invalid config: " + "; ".join(lines)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
