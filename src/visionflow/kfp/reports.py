"""What the Kubeflow UI shows for a step: Markdown and HTML reports built from its result."""

from __future__ import annotations

from typing import Any

from visionflow.host import describe_host


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
        f"{_confusions_html(result)}"
        f"<table border=1><tr>{head}</tr>{rows}</table></body></html>"
    )


def _confusions_html(result) -> str:
    """Classification's most frequent mistakes, by name: the figure shows names only up to
    MAX_LABELLED_CLASSES classes."""
    import html

    from visionflow.vision.metrics import top_confusions

    if result.confusion is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(true)}</td><td>{html.escape(predicted)}</td><td>{count}</td></tr>"
        for true, predicted, count in top_confusions(result.confusion, result.classes)
    )
    return (
        "<h3>Top confusions</h3><table border=1><tr><th>true</th><th>predicted</th>"
        f"<th>images</th></tr>{rows}</table>"
    )


def quantize_report(r) -> str:
    """fp32 and int8 side by side, for the Kubeflow UI; a plain verdict first."""
    from visionflow.steps.quantize import speed_verdict

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


# What optimize's report says when it passed train's checkpoint through (optimize=none).
NOT_OPTIMIZED = (
    "# Not optimized\n\n"
    "`optimize.method=none` (the default): evaluate, export and register take train's checkpoint "
    "as it is.\n\n"
    "To prune it to a share of its MACs and fine-tune it, start the run with the `optimize` "
    "parameter set to `prune` (`overrides` may add `optimize.target_macs=0.5`, "
    "`optimize.epochs=3`).\n"
)


def predict_html(cfg, result) -> str:
    """Batch inference for the Kubeflow UI: figures, the class histogram (a bar chart inline
    and a table), and the undecodable images."""
    import base64
    import html

    from visionflow.storage import split_uri

    store, key = split_uri(result.histogram_png, cfg.storage.endpoint)
    png = base64.b64encode(store.get_bytes(key)).decode()
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:g}</td></tr>"
        for name, value in result.histogram.items()
    )
    bad = "".join(
        f"<li><code>{html.escape(b['key'])}</code>: {html.escape(b['reason'])}</li>"
        for b in result.bad_images[:100]
    )
    more = len(result.bad_images) - 100
    speed = (
        f"{result.images_per_s:.1f} images/s"
        if result.images_per_s
        else "nothing left to predict (every shard was done before)"
    )
    return (
        f"<html><body><h2>{html.escape(result.model_name)} v{result.model_version} "
        f"({html.escape(result.variant)}) on {result.images} images</h2>"
        f"<p>{result.predicted} predicted into <code>{html.escape(result.output)}</code>, "
        f"{result.shards} shards ({result.shards_skipped} finished before this attempt); "
        f"{speed}.</p>"
        f'<img src="data:image/png;base64,{png}"/>'
        f"<table border=1><tr><th>class</th><th>{html.escape(result.histogram_kind)}</th></tr>"
        f"{rows}</table>"
        f"<p><b>{len(result.bad_images)} undecodable images</b>"
        + (f":</p><ul>{bad}</ul>" if bad else ".</p>")
        + (
            f"<p>... and {more} more, in <code>{html.escape(result.bad_images_uri)}</code></p>"
            if more > 0
            else ""
        )  # fmt: skip
        + "</body></html>"
    )
