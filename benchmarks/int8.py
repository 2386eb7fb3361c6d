"""int8 quantization settings side by side on this host: accuracy, saturation, speed vs fp32.

One trained classifier (a run's fp32 ONNX with `--workdir DIR --run-id ID`, else
`experiment=shapes_quick` trained here in about a minute), quantized with each setting ONNX
Runtime offers and measured in one process: test accuracy, top-1 agreement with fp32, how far
this host's int8 kernels stray from what the quantized graph means (the same graph run op by op
in float: large values are saturation), and milliseconds per batch of 1 and 64 with the ratio
fp32 / int8 (above 1: int8 is faster). The row `ours` is what the quantize step uses.
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--workdir", type=Path, help="a workdir with a finished run (default: train one)"
    )
    p.add_argument("--run-id", help="the run in --workdir whose export to quantize")
    p.add_argument("--repeats", type=int, default=30)
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
        run_id = args.run_id or _trained_run(workdir)
        cfg = load_config([f"workdir={workdir}", f"run_id={run_id}"])
        store = open_store(cfg.storage.root, cfg.storage.endpoint)
        exported = load_result(store, run_id, "export")
        dataset_id = load_result(store, run_id, "prepare").dataset_id
        dm = build_datamodule(cfg, store, dataset_id, exported.task)
        src, key = split_uri(exported.onnx_uri)
        fp32 = src.get_file(key, Path(tmp) / "model.onnx")
        calibration = list(_calibration_batches(dm, cfg.quantize.calibration_samples))
        test = [(x.numpy(), y.numpy()) for x, y in dm.test_dataloader()]
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

        print(f"host: {describe_host(host_cpu())}")
        print(f"model: run {run_id}, {len(images)} test images; ours = {json.dumps(SETTINGS)}")
        head = f"{'setting':<16} {'accuracy':>8} {'agree':>7} {'|kernel-graph|':>14} "
        print(head + f"{'ms b1':>7} {'b1 x':>6} {'ms b64':>8} {'b64 x':>6}")
        for name, session in sessions.items():
            out = session.run(None, {"images": images})[0]
            stray = "-"
            if name != "fp32" and VARIANTS[name].get("quant_format") != "QOperator":
                graph = ort_graph_session(files[name]).run(None, {"images": images})[0]
                stray = f"{np.abs(out - graph).max():.3g}"
            print(
                f"{name:<16} {(out.argmax(1) == labels).mean():>8.4f} "
                f"{(out.argmax(1) == reference).mean():>7.4f} {stray:>14} "
                f"{ms[f'{name}_b1']:>7.3f} {ms['fp32_b1'] / ms[f'{name}_b1']:>6.2f} "
                f"{ms[f'{name}_b64']:>8.2f} {ms['fp32_b64'] / ms[f'{name}_b64']:>6.2f}"
            )
