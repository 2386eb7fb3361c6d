"""optimize=prune against the issue's target: at half the MACs, <= 0.5 points lost, >= 1.5x faster.

Trains simple_cnn on shapes (`experiment=shapes_quick`: width 16, 99-100% test accuracy), runs the optimize step on it (prune to `--target-macs`, fine-tune `--epochs`), and reports
test accuracy before and after, and milliseconds per batch of 64 in ONNX Runtime on this CPU,
side by side (the step's own figures).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

MAX_DROP, MIN_SPEEDUP = 0.5, 1.5  # the target: points of accuracy, latency ratio


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary one)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    p.add_argument("--width", type=int, default=16, help="simple_cnn's width")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("overrides", nargs="*", help="more config overrides (trainer.max_epochs=4)")
    args = p.parse_args(argv)
    logging.getLogger("visionflow").setLevel(logging.WARNING)

    from visionflow.core.config import load_config
    from visionflow.host import describe_host
    from visionflow.steps.optimize import BATCH, optimize
    from visionflow.steps.prepare import prepare
    from visionflow.steps.train import train

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp) / "run"
        cfg = load_config(
            [f"workdir={workdir}", "run_id=prune-bench", "experiment=shapes_quick",
             f"model.width={args.width}", "optimize=prune",
             f"optimize.target_macs={args.target_macs}", f"optimize.epochs={args.epochs}",
             f"optimize.bench_repeats={args.repeats}", *args.overrides]
        )  # fmt: skip
        dataset_id = prepare(cfg).dataset_id
        trained = train(cfg, dataset_id)
        r = optimize(cfg, dataset_id, trained.checkpoint_uri)

    print(f"host: {describe_host(r.host)}")
    print(f"simple_cnn width {args.width} on shapes, pruned to {r.macs_kept:.1%} of the MACs "
          f"(target {r.target_macs:.0%}), fine-tuned {r.epochs} epochs")  # fmt: skip
    print(f"{'':<22} {'before':>10} {'after':>10} {'ratio':>7}")
    rows = [
        ("params", r.params_before, r.params_after),
        ("MACs per image", r.macs_before, r.macs_after),
        (f"ORT ms, batch {BATCH}", r.latency_ms_before, r.latency_ms_after),
    ]
    for name, before, after in rows:
        print(f"{name:<22} {before:>10,.2f} {after:>10,.2f} {before / after:>7.2f}")
    print(f"{'test accuracy':<22} {r.score_before:>10.4f} {r.score_after:>10.4f}")
    met = r.score_drop <= MAX_DROP and r.speedup >= MIN_SPEEDUP
    print(
        f"target (<= {MAX_DROP} points lost, >= {MIN_SPEEDUP}x at batch {BATCH}): "
        f"{'met' if met else 'NOT met'} ({r.score_drop:.2f} points lost, {r.speedup:.2f}x faster)"
    )
