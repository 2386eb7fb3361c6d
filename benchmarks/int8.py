"""int8 quantization settings side by side on this host: accuracy, saturation, speed vs fp32.

One trained classifier (a run's fp32 ONNX with `--workdir DIR --run-id ID`; cifar_resnet18
trained on CIFAR-10 JPEGs with `--cifar ROOT`, the model the issue's target is set on; else
`experiment=shapes_quick` trained here in about a minute), quantized with each setting ONNX
Runtime offers and measured in one process: accuracy on held-out images, top-1 agreement with
fp32, how far this host's int8 kernels stray from what the quantized graph means (the same graph
run op by op in float: large values are saturation), and milliseconds per batch of 1 and 64 with
the ratio fp32 / int8 (above 1: int8 is faster). The row `ours` is what the quantize step uses.
Last, the verdict: the setting fastest at batch 64 within 0.5 points of fp32 (`--json` writes
all of it). scripts/gpu_session.sh runs `--cifar` on the GPU machine, whose CPU may have VNNI.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

VARIANTS = {
    "ours": {},
    "u8s8 8-bit": {"reduce_range": False},
    "u8u8": {"reduce_range": False, "weight_type": "QUInt8"},
    "s8s8": {"reduce_range": False, "activation_type": "QInt8"},
    "QOperator": {"quant_format": "QOperator"},
    # 8-bit weights, which VNNI and AMX multiply without saturating, with what loses most kept
    # in fp32 (the first convolution, which sees raw pixels, and the classifier), and with four
    # times the calibration images
    "8-bit ends fp32": {"reduce_range": False, "nodes_to_exclude": "ends"},
    "8-bit calib x4": {"reduce_range": False, "calibration": 4},
}


def _trained_run(workdir: Path) -> str:
    """prepare, train and export `experiment=shapes_quick` (about 99%); returns its run id."""
    from visionflow.core.config import load_config
    from visionflow.steps.export import export
    from visionflow.steps.prepare import prepare
    from visionflow.steps.train import train

    cfg = load_config([f"workdir={workdir}", "run_id=int8-bench", "experiment=shapes_quick"])
    dataset_id = prepare(cfg).dataset_id
    export(cfg, dataset_id, train(cfg, dataset_id).checkpoint_uri)
    return cfg.run_id


def _end_nodes(fp32: Path, prepped: Path) -> list[str]:
    """The names of the first convolution and the last layer (Conv, Gemm or MatMul) of the
    graph quantize_int8 quantizes (after ORT's pre-processing, which renames nothing kept)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
    nodes = onnx.load(str(prepped)).graph.node
    first = next(n.name for n in nodes if n.op_type == "Conv")
    last = next(n.name for n in reversed(nodes) if n.op_type in ("Conv", "Gemm", "MatMul"))
    return [first, last]


def _trained_on_cifar(root: Path, workdir: Path, epochs: int, overrides: list[str]):
    """cifar_resnet18 at 32 px trained on the CIFAR-10 JPEGs at `root` (ImageFolder), exported to
    ONNX as the export step exports; returns (the ONNX file, the config, the datamodule).

    The issue's int8 target is set on this model. It trains with a plain Lightning Trainer (no
    MLflow, no checkpoints: a GPU machine has neither server) on cifar10_fast's split (45,000
    train, 5,000 validation images held out for the accuracies) and data path (decoded once onto
    the GPU, crop and flip there), with SGD at ResNet-18's usual rates: about 90% in 10 epochs.
    """
    import lightning.pytorch as pl

    from visionflow.compose.data import build_datamodule
    from visionflow.compose.models import build_model
    from visionflow.compose.training import build_module, progress_callback
    from visionflow.core.config import load_config, to_container
    from visionflow.steps.prepare import prepare
    from visionflow.storage import open_store
    from visionflow.vision.tasks import get_task

    cfg = load_config(
        ["experiment=cifar10_fast", "model=cifar_resnet18", f"data.root={root}",
         f"workdir={workdir}", "train.compile=false", f"trainer.max_epochs={epochs}",
         "data.batch_size=512", "optim.optimizer.lr=0.4", "optim.optimizer.momentum=0.9",
         "optim.optimizer.weight_decay=5e-4", "optim.norm_lr_scale=1.0",
         "optim.label_smoothing=0.1", *overrides]
    )  # fmt: skip
    dataset_id = prepare(cfg).dataset_id
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dm = build_datamodule(cfg, store, dataset_id, "classification")
    pl.seed_everything(cfg.seed, verbose=False)
    net = build_model(cfg.model, num_classes=len(dm.classes))
    module = build_module(cfg, net, {"task": "classification", "classes": dm.classes})
    args = {k: v for k, v in to_container(cfg.trainer).items() if v is not None}
    trainer = pl.Trainer(
        **args, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(workdir / "lightning"),
        callbacks=[progress_callback()],  # a bar on a terminal, a line per epoch in a log
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    fp32 = get_task("classification").export_onnx(
        net.cpu().eval(), workdir / "model.onnx", cfg.data.image_size
    )
    return fp32, cfg, dm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--workdir",
        type=Path,
        help="a workdir with a finished run (default: train one); with --cifar, where it trains",
    )
    p.add_argument("--run-id", help="the run in --workdir whose export to quantize")
    p.add_argument(
        "--cifar", type=Path, metavar="ROOT",
        help="instead, train cifar_resnet18 on the CIFAR-10 JPEGs at ROOT (the issue's target)",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=10, help="with --cifar")
    p.add_argument("--json", type=Path, help="also write the rows and the verdict here")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("overrides", nargs="*", help="with --cifar: config overrides")
    args = p.parse_args(argv)
    logging.getLogger("visionflow").setLevel(logging.WARNING)

    from visionflow.compose.data import build_datamodule
    from visionflow.core.config import load_config
    from visionflow.host import describe_host, host_cpu
    from visionflow.runs import load_result
    from visionflow.sessions import ort_graph_session, ort_session
    from visionflow.steps.quantize import (
        SETTINGS,
        _calibration_batches,
        bench_batches,
        quantize_int8,
    )
    from visionflow.storage import open_store, split_uri

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp) / "run"
        if args.cifar:
            fp32, cfg, dm = _trained_on_cifar(args.cifar, workdir, args.epochs, args.overrides)
            model = f"cifar_resnet18, {args.epochs} epochs"
            held_out = dm.val_dataloader()
        else:
            run_id = args.run_id or _trained_run(workdir)
            cfg = load_config([f"workdir={workdir}", f"run_id={run_id}"])
            store = open_store(cfg.storage.root, cfg.storage.endpoint)
            exported = load_result(store, run_id, "export")
            dataset_id = load_result(store, run_id, "prepare").dataset_id
            dm = build_datamodule(cfg, store, dataset_id, exported.task)
            src, key = split_uri(exported.onnx_uri)
            fp32 = src.get_file(key, Path(tmp) / "model.onnx")
            model = f"run {run_id}"
            held_out = dm.test_dataloader()
        calibration = list(_calibration_batches(dm, cfg.quantize.calibration_samples))
        # cached loaders serve batches on the GPU
        test = [(x.cpu().numpy(), y.cpu().numpy()) for x, y in held_out]
        images, labels = np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test])

        files = {"fp32": fp32}
        for name, change in VARIANTS.items():
            settings = {**SETTINGS, **change}
            data = calibration
            if times := settings.pop("calibration", None):
                samples = times * cfg.quantize.calibration_samples
                data = list(_calibration_batches(dm, samples))
            if settings.get("nodes_to_exclude") == "ends":
                settings["nodes_to_exclude"] = _end_nodes(fp32, Path(tmp) / "prep.onnx")
            files[name] = quantize_int8(fp32, Path(tmp) / f"{len(files)}.onnx", data, settings)
        sessions = {name: ort_session(path) for name, path in files.items()}
        reference = sessions["fp32"].run(None, {"images": images})[0].argmax(1)
        ms = bench_batches(sessions, images.shape[-1], args.repeats)

        host = describe_host(host_cpu())
        print(f"host: {host}")
        print(f"model: {model}, {len(images)} held-out images; ours = {json.dumps(SETTINGS)}")
        head = f"{'setting':<16} {'accuracy':>8} {'agree':>7} {'|kernel-graph|':>14} "
        print(head + f"{'ms b1':>7} {'b1 x':>6} {'ms b64':>8} {'b64 x':>6}")
        rows = {}
        for name, session in sessions.items():
            out = session.run(None, {"images": images})[0]
            stray = None
            if name != "fp32" and VARIANTS[name].get("quant_format") != "QOperator":
                graph = ort_graph_session(files[name]).run(None, {"images": images})[0]
                stray = float(np.abs(out - graph).max())
            rows[name] = row = {
                "accuracy": float((out.argmax(1) == labels).mean()),
                "agreement": float((out.argmax(1) == reference).mean()),
                "kernel_vs_graph": stray,
                "ms_b1": ms[f"{name}_b1"],
                "speedup_b1": ms["fp32_b1"] / ms[f"{name}_b1"],
                "ms_b64": ms[f"{name}_b64"],
                "speedup_b64": ms["fp32_b64"] / ms[f"{name}_b64"],
            }
            print(
                f"{name:<16} {row['accuracy']:>8.4f} {row['agreement']:>7.4f} "
                f"{'-' if stray is None else f'{stray:.3g}':>14} "
                f"{row['ms_b1']:>7.3f} {row['speedup_b1']:>6.2f} "
                f"{row['ms_b64']:>8.2f} {row['speedup_b64']:>6.2f}"
            )
        verdict = best_within(rows, max_drop=0.005)
        print(f"fastest at batch 64 within 0.5 points of fp32: {json.dumps(verdict)}")
        if args.json:
            report = {"host": host, "model": model, "images": len(images), "rows": rows,
                      "verdict": verdict}  # fmt: skip
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))


def best_within(rows: dict[str, dict], max_drop: float) -> dict:
    """The int8 setting fastest at batch 64 among those within `max_drop` of fp32's accuracy,
    and whether it reaches the issue's target (3x fp32 at batch 64); `setting` is None when
    every one loses more."""
    floor = rows["fp32"]["accuracy"] - max_drop
    kept = {n: r for n, r in rows.items() if n != "fp32" and r["accuracy"] >= floor}
    if not kept:
        return {"setting": None, "speedup_b64": None, "target_3x_met": False}
    name = max(kept, key=lambda n: kept[n]["speedup_b64"])
    drop = rows["fp32"]["accuracy"] - kept[name]["accuracy"]
    return {"setting": name, "speedup_b64": round(kept[name]["speedup_b64"], 3),
            "accuracy_drop_points": round(100 * drop, 2),
            "target_3x_met": kept[name]["speedup_b64"] >= 3}  # fmt: skip
