"""The training pipeline: configure → prepare → train → evaluate → export → quantize → register.

Every knob a person may change when rerunning from the Kubeflow UI is a pipeline parameter;
anything else goes through `overrides` (Hydra `key=value` strings).
"""

from kfp import dsl, kubernetes

from visionflow.kfp.components.configure import configure
from visionflow.kfp.components.evaluate import evaluate
from visionflow.kfp.components.export import export
from visionflow.kfp.components.prepare import prepare
from visionflow.kfp.components.quantize import quantize
from visionflow.kfp.components.register import register
from visionflow.kfp.components.train import train

# Kubernetes settings: used on a cluster, ignored by kfp.local. Secrets are referenced by name;
# no credential is ever part of the compiled pipeline.
S3_SECRET = "visionflow-minio"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (the chart's)
S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}


def on_cluster(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """S3 credentials from the Secret.

    No KFP retries here: KFP v2 retries a task whatever made it fail, so a failed gate or bad
    input would run again to the same end. Each component retries its step in process for
    transient causes only (visionflow.retry: network, MinIO, MLflow); only train keeps a KFP
    retry, for a lost pod.
    """
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
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
        max_epochs=max_epochs, batch_size=batch_size, learning_rate=learning_rate,
        min_score=min_score, max_int8_drop=max_int8_drop,
        registered_model_name=registered_model_name, overrides=overrides, run_id=run_id,
        pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    )  # fmt: skip
    common = {"overrides": cfg.outputs["overrides"], "run_id": cfg.outputs["run_id"]}
    data_task = prepare(**common)
    dataset = data_task.outputs["dataset"]
    train_task = train(**common, dataset=dataset)
    # The train step's own pod only launches and follows a PyTorchJob, whose pods get the GPUs,
    # node selectors, tolerations and shared memory (cluster.* config); it runs under the run's
    # service account (the chart's, allowed to manage PyTorchJobs). Its one KFP retry (for a lost
    # pod) resumes from the last checkpoint. Never cached: a rerun must train, even with the same
    # inputs.
    on_cluster(train_task)
    train_task.set_retry(num_retries=1, backoff_duration="10s")
    train_task.set_caching_options(enable_caching=False)
    model_ckpt = train_task.outputs["model"]
    eval_task = evaluate(**common, dataset=dataset, model=model_ckpt)
    export_task = export(**common, dataset=dataset, model=model_ckpt)
    quant_task = quantize(**common, dataset=dataset, onnx=export_task.outputs["onnx"])
    reg_task = register(
        **common,
        dataset=dataset,
        onnx=export_task.outputs["onnx"],
        torchscript=export_task.outputs["torchscript"],
        int8=quant_task.outputs["int8"],
        gate_passed=eval_task.outputs["gate_passed"],
    )
    for task in (cfg, data_task, eval_task, export_task, quant_task, reg_task):
        on_cluster(task)
    return reg_task.outputs["Output"]
