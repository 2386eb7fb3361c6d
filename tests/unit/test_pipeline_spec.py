"""The compiled pipelines (training, batch inference): parameters a Kubeflow UI rerun can change,
images, cluster wiring, no secrets."""

import pytest
import yaml

from visionflow import __version__
from visionflow.kfp import pipeline
from visionflow.kfp.compile import compile_pipeline
from visionflow.kfp.components import IMAGE
from visionflow.kfp.io import configure_overrides

KNOBS = {"data", "data_root", "data_test_root", "model", "optimize", "max_epochs", "batch_size",
         "learning_rate", "min_score", "max_int8_drop", "registered_model_name", "overrides",
         "run_id"}  # fmt: skip


def test_compiled_pipeline_exposes_every_knob_and_pins_images(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "compile-time-secret-value")
    text = compile_pipeline(tmp_path / "training.yaml").read_text()
    spec, platform = yaml.safe_load_all(text)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == KNOBS
    assert (
        params["overrides"]["parameterType"] == "LIST" and params["overrides"]["defaultValue"] == []
    )
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    # The train step's pod only launches and follows the PyTorchJob: the small CPU image.
    assert images == {IMAGE} and IMAGE.endswith(f":{__version__}")
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "configure",
        "prepare",
        "train",
        "optimize",
        "evaluate",
        "export",
        "quantize",
        "register",
    }
    assert "compile-time-secret-value" not in text
    # Every step gets the release's env ConfigMap, its cluster config as a file and the S3
    # Secret, by name, and has requests, limits and (where it loads data) a memory /dev/shm.
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == len(tasks)
    containers = spec["deploymentSpec"]["executors"]
    assert_release_wiring(
        executors,
        containers,
        {"exec-prepare", "exec-evaluate", "exec-export", "exec-quantize"},
    )
    # Only the train and optimize steps carry the marker that lets cluster.launcher=auto launch
    # a job (each its own step's), and the downward-API names its ownerReference needs.
    env = {n: containers[n]["container"].get("env", []) for n in containers}
    assert [n for n, e in env.items() if e] == ["exec-optimize", "exec-train"]
    for step in ("train", "optimize"):
        assert env[f"exec-{step}"] == [{"name": "VISIONFLOW_KFP_STEP", "value": step}]
        fields = {f["name"]: f["fieldPath"] for f in executors[f"exec-{step}"]["fieldPathAsEnv"]}
        assert fields == {
            "VISIONFLOW_POD_NAME": "metadata.name",
            "VISIONFLOW_POD_UID": "metadata.uid",
        }
    assert "enableCache" not in tasks["train"]["cachingOptions"]
    # KFP retries whatever the cause, so only the steps that follow a cluster job keep a KFP
    # retry (a lost pod: train resumes, optimize starts again); the other steps retry transient
    # causes in process (visionflow.retry).
    retried = {name: t["retryPolicy"]["maxRetryCount"] for name, t in tasks.items()
               if "retryPolicy" in t}  # fmt: skip
    assert retried == {"train": 1, "optimize": 1}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        body = executor["container"]["command"][-1]
        assert "configure" in name or "retrying(" in body, name


def test_optimize_comes_after_train_and_everything_downstream_takes_its_model(tmp_path):
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    tasks = spec["root"]["dag"]["tasks"]

    def producer(task: str, artifact: str) -> tuple[str, str]:
        source = tasks[task]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
        return source["producerTask"], source["outputArtifactKey"]

    assert producer("optimize", "model") == ("train", "model")
    for step in ("evaluate", "export", "register"):
        assert producer(step, "model") == ("optimize", "optimized"), step
    # Nothing downstream reads train's checkpoint past optimize.
    readers = {t for t in tasks if "train" in tasks[t].get("dependentTasks", [])}
    assert readers == {"optimize"}
    # The UI parameter reaches configure, which turns it into the `optimize=` override.
    configure_inputs = tasks["configure"]["inputs"]["parameters"]
    assert configure_inputs["optimize"] == {"componentInputParameter": "optimize"}
    # optimize learns the resolved method from configure (a pass-through loads no config).
    method = tasks["optimize"]["inputs"]["parameters"]["method"]["taskOutputParameter"]
    assert (method["producerTask"], method["outputParameterKey"]) == (
        "configure",
        "optimize_method",
    )


def test_components_only_call_into_the_package(tmp_path):
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    for name, executor in spec["deploymentSpec"]["executors"].items():
        body = executor["container"]["command"][-1]
        assert "from visionflow" in body, name
        assert "pip install" not in " ".join(executor["container"]["command"]), name


def test_unset_parameters_keep_the_config_and_overrides_come_last():
    knobs = dict(data="imagefolder", data_root="/d", data_test_root="", model="",
                 optimize="prune", max_epochs=0, batch_size=64, learning_rate=0.0, min_score=0.0,
                 max_int8_drop=-1.0, registered_model_name="")  # fmt: skip
    overrides, run_id = configure_overrides(knobs, ["trainer.max_epochs=2"], "job-7")
    assert overrides == ["data=imagefolder", "data.root='/d'", "optimize=prune",
                         "data.batch_size=64", "evaluate.min_score=0.0",
                         "trainer.max_epochs=2"]  # fmt: skip
    assert run_id == "job-7"
    assert configure_overrides({k: v for k, v in knobs.items() if k != "data"}, [], "")[
        1
    ]  # a fresh id


BATCH_KNOBS = {"model", "input", "output", "shard_size", "batch_size", "top_k",
               "max_bad_fraction", "variant", "overrides", "run_id"}  # fmt: skip


def test_batch_inference_pipeline_is_wired_to_the_cluster_like_the_training_one(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "compile-time-secret-value")
    text = compile_pipeline(tmp_path / "batch.yaml", "batch_inference").read_text()
    assert "compile-time-secret-value" not in text
    spec, platform = yaml.safe_load_all(text)
    assert spec["pipelineInfo"]["name"] == "visionflow-batch-inference"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == BATCH_KNOBS
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"configure-predict", "predict"}
    # The predict step is never cached (the same parameters over changed input must predict
    # again) and has no KFP retry (it retries transient causes in process and resumes).
    assert "enableCache" not in tasks["predict"]["cachingOptions"]
    assert not [name for name, t in tasks.items() if "retryPolicy" in t]
    containers = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in containers.values()} == {IMAGE}
    assert "retrying(" in containers["exec-predict"]["container"]["command"][-1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(containers)
    assert_release_wiring(executors, containers, {"exec-predict"})


def assert_release_wiring(executors: dict, containers: dict, with_shm: set[str]) -> None:
    """Every step gets the release's env ConfigMap, its cluster config as a file and the S3
    Secret, by name, and has requests and limits; those in `with_shm` (they load data), and no
    others, a memory-backed /dev/shm."""
    for name, executor in executors.items():
        (secret,) = executor["secretAsEnv"]
        assert secret["secretName"] == pipeline.S3_SECRET
        envs = {k["envVar"] for e in executor["configMapAsEnv"] for k in e["keyToEnv"]}
        assert envs == {*pipeline.ENV_KEYS, *pipeline.ENV_OPTIONAL_KEYS}
        (mount,) = executor["configMapAsVolume"]
        assert (mount["configMapName"], mount["mountPath"]) == (
            pipeline.SITE_CONFIG_MAP,
            pipeline.SITE_MOUNT,
        )
        resources = containers[name]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                "resourceMemoryLimit"} <= set(resources), name  # fmt: skip
        shm = [d for d in executor.get("emptyDirMounts", []) if d["mountPath"] == "/dev/shm"]
        assert bool(shm) == (name in with_shm), name
        assert all(d["medium"] == "Memory" for d in shm)


def test_batch_parameters_become_predict_overrides_and_are_checked():
    from visionflow.kfp.io import PREDICT_KNOBS
    from visionflow.kfp.params import ParameterError

    knobs = dict(model="visionflow-shapes@champion", input="s3://b/images, 2024", output="",
                 shard_size=500, batch_size=0, top_k=0, max_bad_fraction=0.0, variant="")  # fmt: skip
    overrides, run_id = configure_overrides(knobs, ["predict.top_k=3"], "batch-7", PREDICT_KNOBS)
    assert overrides == ["predict.model='visionflow-shapes@champion'",
                         "predict.input='s3://b/images, 2024'", "predict.shard_size=500",
                         "predict.max_bad_fraction=0.0", "predict.top_k=3"]  # fmt: skip
    assert run_id == "batch-7"
    with pytest.raises(ParameterError, match="storage.root"):
        configure_overrides(knobs, ["storage.root=s3://other"], "batch-7", PREDICT_KNOBS)


def test_optimize_off_passes_train_s_checkpoint_and_result_through(tmp_path):
    """optimize.method=none: the artifact evaluate, export and register read is train's own,
    and the report says how to switch pruning on; no config, network or data is loaded."""
    from kfp import dsl

    from visionflow.kfp.components.optimize import optimize
    from visionflow.kfp.io import read_model, uri_of, write_pointer
    from visionflow.results import TrainResult

    trained = TrainResult(checkpoint_uri="s3://b/checkpoints/r1/best.ckpt",
                          last_checkpoint_uri="s3://b/checkpoints/r1/last.ckpt", monitor="val/acc",
                          best_score=0.9, global_step=10, epochs=1, resumed_from_step=None,
                          mlflow_run_id="m1", spec={"task": "classification", "dataset_id": "d1"},
                          final_metrics={"val/acc": 0.9})  # fmt: skip
    model = dsl.Model(uri=str(tmp_path / "model"))
    write_pointer(model, trained.checkpoint_uri, trained)  # as the train component does
    optimized = dsl.Model(uri=str(tmp_path / "optimized"))
    report = dsl.Markdown(uri=str(tmp_path / "report"))
    optimize.python_func(
        overrides=["no_such_key=1"],  # never loaded
        run_id="r1",
        method="none",
        dataset=dsl.Dataset(uri=str(tmp_path / "dataset"), metadata={"dataset_id": "d1"}),
        model=model,
        optimized=optimized,
        metrics=dsl.Metrics(uri=str(tmp_path / "metrics")),
        report=report,
    )
    assert uri_of(optimized) == trained.checkpoint_uri
    assert read_model(optimized) == (trained, None) == read_model(model)
    assert "`optimize` parameter set to `prune`" in (tmp_path / "report").read_text()
