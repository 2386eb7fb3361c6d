"""What the KFP components share: config from the pipeline's parameters, artifact pointers.

A component body stays a few lines: build the config, call one step, describe its outputs.
Artifacts carry a small JSON pointer (the store URI plus figures) rather than the bytes: the
datasets and models themselves live in the artifact store (MinIO on a cluster).
"""

from __future__ import annotations

import json
from typing import Any

from visionflow import logs
from visionflow.core.config import load_config


def step_config(overrides: list[str], run_id: str):
    from visionflow.core.factories import validate

    logs.setup()
    cfg = load_config([*overrides, f"run_id={run_id}"])
    validate(cfg)
    return cfg


def write_pointer(artifact, uri: str, **metadata: Any) -> None:
    """Point a KFP artifact at `uri`; figures go to its metadata for the UI and later steps."""
    artifact.metadata["uri"] = uri
    artifact.metadata.update(metadata)
    with open(artifact.path, "w") as f:
        json.dump({"uri": uri, **metadata}, f, indent=2, default=str)


def uri_of(artifact) -> str:
    """The store URI an upstream artifact points at (metadata first, else its JSON file)."""
    if uri := artifact.metadata.get("uri"):
        return uri
    with open(artifact.path) as f:
        return json.load(f)["uri"]


# Pipeline parameter -> Hydra override. A parameter left at its "unset" value (empty, 0, or
# negative) keeps what the config says, so experiments and `overrides` are not overridden by
# the pipeline's own defaults.
_KNOBS = {
    "data": "data={}",
    "data_root": "data.root={}",
    "data_test_root": "data.test_root={}",
    "model": "model={}",
    "max_epochs": "trainer.max_epochs={}",
    "batch_size": "data.batch_size={}",
    "learning_rate": "optim.optimizer.lr={}",
    "min_score": "evaluate.min_score={}",
    "max_int8_drop": "quantize.max_accuracy_drop={}",
    "registered_model_name": "register.model_name={}",
}


def configure_overrides(
    knobs: dict[str, Any], overrides: list[str], run_id: str
) -> tuple[list[str], str]:
    """Overrides for the pipeline's parameters, then the user's own, and the run id to use."""
    out = []
    for name, value in knobs.items():
        if isinstance(value, str):
            unset = value == ""
        elif name == "min_score":  # 0 is a meaningful gate (no gate)
            unset = value < 0
        else:
            unset = value <= 0
        if not unset:
            out.append(_KNOBS[name].format(value))
    from visionflow.core.config import new_run_id

    return out + [str(o) for o in overrides], run_id or new_run_id()


def prepare_report(manifest: dict[str, Any]) -> str:
    lines = [f"# Dataset {manifest['id']}", "", f"Source: `{manifest['source']}`", "",
             "| split | images | shards |", "|---|---|---|"]  # fmt: skip
    for split, info in manifest["splits"].items():
        lines.append(f"| {split} | {info['count']} | {len(info['shards'])} |")
    bad = manifest["bad_files"]
    lines += [
        "",
        f"Classes ({len(manifest['classes'])}): {', '.join(manifest['classes'][:50])}",
        "",
    ]
    lines.append(f"**{len(bad)} unusable files skipped**" + (":" if bad else "."))
    lines += [f"- `{b['source']}`: {b['reason']}" for b in bad[:100]]
    return "\n".join(lines) + "\n"


def evaluation_html(cfg, result) -> str:
    """The evaluation picture (inline) and the per-class table, for the Kubeflow UI."""
    import base64
    import html

    from visionflow.storage import split_uri

    store, key = split_uri(result.figure_png, cfg.storage.endpoint)
    png = base64.b64encode(store.get_bytes(key)).decode()
    columns = list(next(iter(result.per_class.values()), {}))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["class", *columns])
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{row[c]:.3f}</td>" for c in columns)
        + "</tr>"
        for name, row in result.per_class.items()
    )
    summary = ", ".join(
        f"{html.escape(k)} {v:.4f}" for k, v in result.metrics.items() if "/" not in k
    )
    verdict = "passed" if result.gate_passed else "FAILED"
    return (
        f"<html><body><h2>Test {result.metric} {result.score:.4f}</h2><p>{summary}</p>"
        f"<p>Quality gate (&ge; {result.min_score}): <b>{verdict}</b></p>"
        f'<img src="data:image/png;base64,{png}"/>'
        f"<table border=1><tr>{head}</tr>{rows}</table></body></html>"
    )


def quantize_report(r) -> str:
    """fp32 and int8 side by side, for the Kubeflow UI; a plain verdict first."""
    from visionflow.steps.quantize import speed_verdict
    from visionflow.vision.inference import describe_host

    lines = ["# int8 quantization", ""]
    if r.status == "unsupported":
        return "\n".join([*lines, r.reason, ""])
    verdict = (
        speed_verdict(r) if r.status == "stored" else f"**{r.reason}**; the run goes on with fp32."
    )
    if r.status == "stored" and r.serve_variant != "int8":
        verdict = f"**{verdict}**"
    lines += [verdict, "", "| | fp32 | int8 |", "|---|---|---|"]
    lines.append(f"| test {r.metric} | {r.fp32_score:.4f} | {r.int8_score:.4f} |")
    for b in (1, 64):
        if f"fp32_b{b}" in r.latency_ms:
            lines.append(
                f"| ms per batch of {b} | {r.latency_ms[f'fp32_b{b}']:.2f} | "
                f"{r.latency_ms[f'int8_b{b}']:.2f} |"
            )
    lines += [
        "",
        f"Drop: {r.accuracy_drop:.2f} points. Agreement with fp32 (the same class per image, or "
        f"per pixel for segmentation): {r.parity.agreement:.2%} on {r.parity.samples} test images.",
        "",
        f"Host: {describe_host(r.host)}.",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in r.settings.items()) + ".",
    ]
    return "\n".join(lines) + "\n"
