"""The training pipeline: configure → prepare → train → optimize → evaluate → export → quantize
→ register.

Every knob a person may change when rerunning from the Kubeflow UI is a pipeline parameter;
anything else goes through `overrides` (Hydra `key=value` strings).

The optimize step is always in the graph: with `optimize=prune` it prunes and fine-tunes train's
checkpoint, and evaluate, export (quantize through it) and register take the pruned one; with
`optimize.method=none`, the default, it passes train's checkpoint and result through unchanged
(configure hands it the method: it loads no config, torch or data) and its report says how to
switch pruning on. Not a `dsl.If`: kfp.local's support for conditions is recent (released
versions always took the false branch, kubeflow/pipelines#13313), the steps after it would need
`dsl.OneOf` to take either branch's model, and the cluster simulation plays compiled pipelines
without conditions; a pass-through runs the same in kfp.local, the simulation and a cluster.
"""

from kfp import dsl, kubernetes

from visionflow.cluster.pytorchjob import KFP_STEP_ENV, POD_NAME_ENV, POD_UID_ENV
from visionflow.kfp.components.configure import configure
from visionflow.kfp.components.evaluate import evaluate
from visionflow.kfp.components.export import export
from visionflow.kfp.components.optimize import optimize as optimize_component  # `optimize`: a param
from visionflow.kfp.components.prepare import prepare
from visionflow.kfp.components.quantize import quantize
from visionflow.kfp.components.register import register
from visionflow.kfp.components.train import train

# Kubernetes settings: used on a cluster, ignored by kfp.local. Everything a step needs from
# the cluster comes from the release (charts/visionflow): its env ConfigMap, its cluster config
# (a Hydra file that says where artifacts and runs go) and its S3 Secret, referenced by name; no
# credential is ever part of the compiled pipeline. The names below are those of a release named
# `visionflow` with the default Secret; the copy of this pipeline that a release ships and
# uploads names its own (templates/configmap-kfp.yaml), so a run started in the Kubeflow UI with
# the default parameters uses that release's MinIO, MLflow and Secret.
ENV_CONFIG_MAP = "visionflow-env"
ENV_KEYS = ("VISIONFLOW_SITE_CONFIG", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
ENV_OPTIONAL_KEYS = ("MLFLOW_TRACKING_URI",)  # absent when the release names no MLflow
SITE_CONFIG_MAP = "visionflow-config"
SITE_MOUNT = "/var/run/visionflow/site"  # VISIONFLOW_SITE_CONFIG: <SITE_MOUNT>/cluster.yaml
S3_SECRET = "visionflow-minio"
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
# Requests and limits per step pod (CPU, memory), and a memory-backed /dev/shm for the steps
# that load data with DataLoader workers. The train and optimize steps' pods only launch and
# follow a cluster job (whose pods get cluster.* resources and GPUs), or pass train's checkpoint
# through (optimize by default), so they are small.
RESOURCES = {
    "configure": ("1", "2Gi", None),
    "prepare": ("4", "16Gi", "2Gi"),
    "train": ("1", "2Gi", None),
    "optimize": ("1", "2Gi", None),
    "evaluate": ("4", "16Gi", "2Gi"),
    "export": ("2", "8Gi", "2Gi"),
    "quantize": ("4", "16Gi", "2Gi"),
    "register": ("1", "4Gi", None),
    # The batch inference pipeline's (visionflow.kfp.batch_pipeline): it decodes images in
    # threads and runs ONNX Runtime on the pod's cores.
    "predict": ("4", "16Gi", "1Gi"),
}


def launches_job(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    """For a step whose work runs as a cluster job (train; optimize, when it prunes): the
    marker that lets it launch one, and the step pod's own name and uid (downward API), which
    the job names as its owner, so that deleting the run deletes the job. Its one KFP retry
    (for a lost pod) launches the job again: train resumes from its last checkpoint, optimize
    prunes and fine-tunes again."""
    task.set_env_variable(KFP_STEP_ENV, step)
    kubernetes.use_field_path_as_env(task, POD_NAME_ENV, "metadata.name")
    kubernetes.use_field_path_as_env(task, POD_UID_ENV, "metadata.uid")
    task.set_retry(num_retries=1, backoff_duration="10s")
    return task


def on_cluster(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    """The release's configuration, the S3 credentials, resources and /dev/shm for one step.

    No KFP retries here: KFP v2 retries a task whatever made it fail, so a failed gate or bad
    input would run again to the same end. Each component retries its step in process for
    transient causes only (visionflow.retry: network, MinIO, MLflow); only the steps that follow
    a cluster job keep a KFP retry, for a lost pod (launches_job).
    """
    kubernetes.use_config_map_as_env(task, ENV_CONFIG_MAP, {k: k for k in ENV_KEYS})
    kubernetes.use_config_map_as_env(
        task, ENV_CONFIG_MAP, {k: k for k in ENV_OPTIONAL_KEYS}, optional=True
    )
    kubernetes.use_config_map_as_volume(task, SITE_CONFIG_MAP, SITE_MOUNT)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    cpu, memory, shm = RESOURCES[step]
    task.set_cpu_request(str(float(cpu) / 4)).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    if shm:
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=shm)
    return task


@dsl.pipeline(
    name="visionflow-training",
    description="Raw images to a registered, exported, int8-quantized vision model.",
)
def training_pipeline(
    data: str = "",
    data_root: str = "",
    data_test_root: str = "",
    model: str = "",
    optimize: str = "",
    max_epochs: int = 0,
    batch_size: int = 0,
    learning_rate: float = 0.0,
    min_score: float = -1.0,
    max_int8_drop: float = -1.0,
    registered_model_name: str = "",
    overrides: list = [],  # noqa: B006  (KFP reads the default as the parameter's default)
    run_id: str = "",
) -> str:
    cfg = configure(
        data=data, data_root=data_root, data_test_root=data_test_root, model=model,
        optimize=optimize, max_epochs=max_epochs, batch_size=batch_size,
        learning_rate=learning_rate, min_score=min_score, max_int8_drop=max_int8_drop,
        registered_model_name=registered_model_name, overrides=overrides, run_id=run_id,
        pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )  # fmt: skip
    common = {"overrides": cfg.outputs["overrides"], "run_id": cfg.outputs["run_id"]}
    data_task = prepare(**common)
    dataset = data_task.outputs["dataset"]
    train_task = train(**common, dataset=dataset)
    # The train step's own pod only launches and follows a PyTorchJob, whose pods get the GPUs,
    # node selectors, tolerations and shared memory (cluster.* config); it runs under the run's
    # service account (the chart's, allowed to manage PyTorchJobs). Never cached: a rerun must
    # train, even with the same inputs. Optimize's pod does the same for its fine-tuning.
    launches_job(train_task, "train").set_caching_options(enable_caching=False)
    opt_task = optimize_component(
        **common,
        method=cfg.outputs["optimize_method"],
        dataset=dataset,
        model=train_task.outputs["model"],
    )
    launches_job(opt_task, "optimize")
    model_ckpt = opt_task.outputs["optimized"]
    eval_task = evaluate(**common, dataset=dataset, model=model_ckpt)
    export_task = export(**common, dataset=dataset, model=model_ckpt)
    quant_task = quantize(**common, dataset=dataset, onnx=export_task.outputs["onnx"])
    reg_task = register(
        **common,
        dataset=dataset,
        model=model_ckpt,
        evaluation=eval_task.outputs["evaluation"],
        onnx=export_task.outputs["onnx"],
        int8=quant_task.outputs["int8"],
    )
    for step, task in (
        ("configure", cfg),
        ("prepare", data_task),
        ("train", train_task),
        ("optimize", opt_task),
        ("evaluate", eval_task),
        ("export", export_task),
        ("quantize", quant_task),
        ("register", reg_task),
    ):
        on_cluster(task, step)  # fmt: skip
    return reg_task.outputs["Output"]
