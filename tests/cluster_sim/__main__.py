"""`python -m tests.cluster_sim [--root DIR] [--param NAME=VALUE ...]` (what `make cluster-sim` runs).

Prints the simulation's JSON summary on stdout (progress goes to stderr); exits 0 when the run
succeeded and every isolation check held, 1 otherwise, 77 when this machine cannot make the
namespaces a pod needs (not root, no unshare), with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster_sim import sandbox
from tests.cluster_sim.kfp_runner import TaskFailed
from tests.cluster_sim.netns import NamespacesUnavailable
from tests.cluster_sim.sim import Simulation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster-sim", description=__doc__)
    parser.add_argument("--root", type=Path, help="working directory (default: a new one)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter (a JSON value or a string); default: none")  # fmt: skip
    args = parser.parse_args(argv)
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    root = args.root or Path(tempfile.mkdtemp(prefix="visionflow-sim-", dir="/var/tmp"))

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with Simulation(root, echo=echo) as sim:
            summary = sim.run(params)
    except (sandbox.SandboxUnavailable, NamespacesUnavailable) as err:
        echo(f"cluster-sim: skipped: {err}")
        return 77
    except TaskFailed as err:
        echo(f"cluster-sim: the run failed at {err.task}:\n{err.log_tail}")
        return 1
    summary["sim_seconds"] = round(time.monotonic() - started, 1)
    summary["sim_root"] = str(root)
    print(json.dumps(summary, indent=2))
    ok = not summary["isolation"]["problems"]
    echo(f"cluster-sim: {'ok' if ok else 'ISOLATION CHECKS FAILED'} in {summary['sim_seconds']} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
