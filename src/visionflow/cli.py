"""The `visionflow` command.

visionflow <step> [key=value ...]      run one step: prepare, train, optimize (with
                                       optimize=prune), evaluate, export, quantize, register
                                       (Hydra overrides), on what the run's earlier steps made
visionflow train|optimize|evaluate|export --dataset ID [--checkpoint URI] [key=value ...]
                                       ... or on this dataset (and checkpoint)
visionflow pipeline run [key=value ...] the whole pipeline on this machine (kfp.local)
visionflow pipeline run --pipeline batch_inference predict.model=M predict.input=... [...]
                                       the batch inference pipeline, likewise
visionflow pipeline run|submit -m key=a,b ...  a sweep: one run per combination
visionflow pipeline compile [-o FILE]  write the compiled pipeline YAML
visionflow serve MODEL [key=value ...]  the HTTP service (MODEL: name, name@alias, name/version)
visionflow promote NAME VERSION [--alias A]  move an alias under register's rules
visionflow predict predict.model=M predict.input=DIR|s3://... [key=value ...]
                                       batch inference into Parquet
visionflow list models|datamodules|transforms|callbacks [PATTERN]
visionflow config [key=value ...]      print the resolved config
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from visionflow import logs
from visionflow.runs import STEPS

EXIT_CONFIG, EXIT_FAILED = 2, 1
# The steps that take --dataset, and --checkpoint, in place of what the run's records say.
TAKE_DATASET = ("train", "optimize", "evaluate", "export")
TAKE_CHECKPOINT = ("optimize", "evaluate", "export")
MULTIRUN_HELP = "a sweep: one run per combination of key=a,b / choice() / range() / glob()"


def _latest_file(workdir: str) -> Path:
    return Path(workdir) / "runs" / "LATEST"


def _step_config(step: str, overrides: list[str]):
    """Config for one step. Without run_id=..., prepare starts a new run and later steps
    continue the latest one."""
    from visionflow.compose.validation import validate
    from visionflow.core.config import ConfigError, load_config

    given = any(o.startswith("run_id=") for o in overrides)
    cfg = load_config(overrides)
    validate(cfg)
    latest = _latest_file(cfg.workdir)
    if not given and step != "prepare":
        if not latest.is_file():
            raise ConfigError(
                "no run to continue: run `visionflow prepare` first or pass run_id=..."
            )
        cfg.run_id = latest.read_text().strip()
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(cfg.run_id + "\n")
    return cfg


def run_step(
    step: str,
    overrides: list[str],
    dataset_id: str | None = None,
    checkpoint_uri: str | None = None,
) -> dict:
    """Run one step on what the run's earlier steps made (their records in the store), or on
    the dataset and checkpoint given."""
    import dataclasses
    import importlib

    from visionflow.cluster.pytorchjob import JOB_STEPS
    from visionflow.runs import step_inputs
    from visionflow.storage import open_store

    cfg = _step_config(step, overrides)
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    inputs = step_inputs(store, cfg.run_id, step, dataset_id, checkpoint_uri)
    module = importlib.import_module(f"visionflow.steps.{step}")
    if step in JOB_STEPS:  # here, or as a cluster job (cluster.launcher)
        result = getattr(module, f"{step}_anywhere")(cfg, overrides, **inputs)
    else:
        result = getattr(module, step)(cfg, **inputs)
    if result is None:  # a rank other than 0 of a distributed optimize: rank 0 records it
        return {"run_id": cfg.run_id, "rank": int(os.environ.get("RANK", "0"))}
    out = dataclasses.asdict(result)
    out.pop("manifest", None)  # long; it is in the store
    return {"run_id": cfg.run_id, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="visionflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for step in STEPS:
        p = sub.add_parser(step, help=f"run the {step} step")
        if step in TAKE_DATASET:
            p.add_argument(
                "--dataset",
                metavar="ID",
                help="the prepared dataset's id (default: the run's, from its prepare step)",
            )
        if step in TAKE_CHECKPOINT:
            p.add_argument(
                "--checkpoint",
                metavar="URI",
                help="the checkpoint's URI (default: the run's model: its optimize step's, else "
                "its train step's best)",
            )
        p.add_argument("overrides", nargs="*", metavar="key=value")
    pipe = sub.add_parser("pipeline", help="run or compile the whole pipeline")
    pipe_sub = pipe.add_subparsers(dest="action", required=True)
    pr = pipe_sub.add_parser("run", help="run the pipeline on this machine (kfp.local)")
    pr.add_argument("-m", "--multirun", action="store_true", help=MULTIRUN_HELP)
    pr.add_argument(
        "--pipeline",
        choices=("training", "batch_inference"),
        default="training",
        help="which pipeline (default: training)",
    )
    pr.add_argument("overrides", nargs="*", metavar="key=value")
    ps = pipe_sub.add_parser("submit", help="upload the pipeline to Kubeflow Pipelines and run it")
    ps.add_argument("--host", required=True, help="KFP URL, e.g. http://localhost:8080")
    ps.add_argument("--experiment", default="visionflow")
    ps.add_argument("--name", default="visionflow-training", help="pipeline name in KFP")
    ps.add_argument("--namespace", help="Kubeflow profile namespace (multi-user KFP)")
    ps.add_argument("--package", help="compiled pipeline YAML (default: compile now)")
    ps.add_argument("--run-name")
    ps.add_argument("--service-account", default="visionflow")
    ps.add_argument("--wait", action="store_true", help="follow the run to its end")
    ps.add_argument("--timeout", type=float, default=86400)
    ps.add_argument("-m", "--multirun", action="store_true", help=MULTIRUN_HELP)
    ps.add_argument("overrides", nargs="*", metavar="key=value")
    pu = pipe_sub.add_parser("upload", help="upload a compiled pipeline as a version (idempotent)")
    pu.add_argument("--host", required=True)
    pu.add_argument("--package", required=True)
    pu.add_argument("--name", required=True)
    pu.add_argument("--namespace")
    pc = pipe_sub.add_parser("compile", help="write the compiled pipeline YAML")
    pc.add_argument("-o", "--output", default="pipelines/training.yaml")
    sv = sub.add_parser("serve", help="serve registered model versions over HTTP (FastAPI)")
    sv.add_argument("model", metavar="MODEL", help="name, name@alias or name/version")
    sv.add_argument("overrides", nargs="*", metavar="key=value")
    pm = sub.add_parser("promote", help="move an alias to a version, under register's rules")
    pm.add_argument("name")
    pm.add_argument("version", type=int)
    pm.add_argument("--alias", default="champion")
    pm.add_argument("overrides", nargs="*", metavar="key=value")
    pd = sub.add_parser("predict", help="batch inference: images in, Parquet predictions out")
    pd.add_argument("overrides", nargs="*", metavar="key=value")
    ls = sub.add_parser("list", help="list registered names")
    ls.add_argument("kind", choices=["models", "datamodules", "transforms", "callbacks"])
    ls.add_argument("pattern", nargs="?", default="*")
    cl = sub.add_parser("cluster", help="cluster tools")
    cl_sub = cl.add_subparsers(dest="action", required=True)
    rj = cl_sub.add_parser(
        "render-job", help="print the PyTorchJob or TrainJob (cluster.api) a run would submit"
    )
    rj.add_argument("overrides", nargs="*", metavar="key=value")
    cf = sub.add_parser("config", help="print the resolved config")
    cf.add_argument("overrides", nargs="*", metavar="key=value")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "promote" and all("=" in a for a in extra):
        args.overrides += extra  # `promote NAME V --alias A key=value`: overrides after the flag
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    logs.setup()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("visionflow: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure ends with one clear line and a non-zero exit
        return _fail(err)


def _dispatch(args) -> int:
    if args.command == "pipeline" and getattr(args, "multirun", False):
        from visionflow.kfp import sweep

        if getattr(args, "pipeline", "training") != "training":
            from visionflow.core.config import ConfigError

            raise ConfigError("a sweep (-m) runs the training pipeline only: drop --pipeline")
        return sweep.cli_run(args.overrides) if args.action == "run" else sweep.cli_submit(args)
    if args.command in STEPS:
        given = getattr(args, "dataset", None), getattr(args, "checkpoint", None)
        print(json.dumps(run_step(args.command, args.overrides, *given), default=str))
    elif args.command == "pipeline" and args.action == "run":
        from visionflow.kfp.local import run_local

        summary, path = run_local(args.overrides, args.pipeline)
        print(json.dumps(summary))
        print(f"summary written to {path}", file=sys.stderr)
    elif args.command == "pipeline" and args.action == "upload":
        from visionflow.kfp.submit import upload

        pipeline_id, version_id = upload(
            args.host, Path(args.package), args.name, namespace=args.namespace
        )
        print(json.dumps({"pipeline_id": pipeline_id, "version_id": version_id}))
    elif args.command == "pipeline" and args.action == "submit":
        _submit(args)
    elif args.command == "pipeline" and args.action == "compile":
        from visionflow.kfp.compile import compile_pipeline

        print(f"compiled {compile_pipeline(Path(args.output))}")
    elif args.command == "serve":
        from visionflow.serving.app import serve

        serve(args.model, args.overrides)
    elif args.command == "promote":
        from visionflow.steps.register import promote

        print(json.dumps(promote(args.name, args.version, args.alias, args.overrides)))
    elif args.command == "predict":
        import dataclasses

        from visionflow.core.config import load_config
        from visionflow.steps.predict import predict

        cfg = load_config(args.overrides)  # its own run: rerun with its run_id=... to resume
        print(json.dumps({"run_id": cfg.run_id, **dataclasses.asdict(predict(cfg))}, default=str))
    elif args.command == "list":
        import visionflow.compose.validation  # noqa: F401  (fills every registry)
        from visionflow.core import registry

        reg = getattr(registry, args.kind.upper())
        print("\n".join(reg.list(args.pattern)))
    elif args.command == "cluster" and args.action == "render-job":
        import yaml

        from visionflow.cluster.training import build_job
        from visionflow.core.config import load_config

        job = build_job(load_config(args.overrides), args.overrides)  # validated
        print(yaml.safe_dump(job, sort_keys=False), end="")
    elif args.command == "config":
        from omegaconf import OmegaConf

        from visionflow.compose.validation import check_options
        from visionflow.core.config import load_config

        cfg = load_config(args.overrides)  # the schema and every `_target_` block
        check_options(cfg)  # the model, transforms and callbacks it names
        print(OmegaConf.to_yaml(cfg), end="")
    return 0


def _submit(args) -> None:
    import dataclasses
    import tempfile
    import time

    from visionflow.compose.validation import validate
    from visionflow.core.config import load_config
    from visionflow.kfp.compile import compile_pipeline
    from visionflow.kfp.submit import params_from_overrides, submit

    # Where artifacts and runs go on the cluster is the release's business (its mounted
    # cluster config); a run's overrides only say what to train. What the cluster would refuse
    # is refused first: composing the config imports every `_target_` it names.
    params = params_from_overrides(args.overrides)
    validate(load_config(args.overrides))  # a bad config fails here, not in the cluster
    with tempfile.TemporaryDirectory() as tmp:
        package = (
            Path(args.package) if args.package else compile_pipeline(Path(tmp) / "training.yaml")
        )
        run_name = (
            args.run_name or params["run_id"] or f"{args.name} {time.strftime('%Y-%m-%d %H-%M-%S')}"
        )
        result = submit(
            args.host, package, args.name, args.experiment, run_name, params, wait=args.wait,
            timeout_s=args.timeout, namespace=args.namespace, service_account=args.service_account,
        )  # fmt: skip
    print(f"run {result.run_id}: {result.url}", file=sys.stderr)
    print(json.dumps(dataclasses.asdict(result)))


def _fail(err: Exception) -> int:
    """One clear line for a user's error; the traceback first for anything else (a bug).

    A user's errors are the ones visionflow raises for them, of the exception types it defines
    (ConfigError, the registries' UnknownNameError, StorageError, ...), and OSError, the
    environment's (a missing file, a refused connection). Anything else, a KeyError or a
    TypeError, is a bug, and its traceback is what a report needs.
    """
    from visionflow.core.config import ConfigError
    from visionflow.core.registry import UnknownNameError

    users = isinstance(err, OSError) or type(err).__module__.partition(".")[0] == "visionflow"
    if not users:
        import traceback

        traceback.print_exception(err)
    print(f"visionflow: error: {err}", file=sys.stderr)
    return EXIT_CONFIG if isinstance(err, ConfigError | UnknownNameError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
