"""`visionflow serve` vs `mlflow models serve` on one registered version, under load from locust.

`make bench-serve [ARGS='--workdir DIR --seconds 25 serve.max_delay_ms=0 ...']`. One registered
classifier (the default pipeline, run into a new workdir: 2-4 minutes on an idle machine; or
the latest version already in `--workdir DIR`'s registry), served by both servers at once on
free 127.0.0.1 ports, both running the same ONNX file (`--variant`, fp32 by default: ours
through serve.variant, MLflow's through the pyfunc's model config override SERVING_MODEL_CONFIG;
their logits are compared before the load). locust (headless, one process, in its own venv
`.venv-bench`: it needs a newer `requests` than kfp allows) posts one pre-serialised image
(1, 3, H, W) per request with N concurrent users, back to back; cells alternate servers so that
drift hits both alike. A table of req/s, p50, p99 and errors per server and user count, the
ratios ours / MLflow, ours' server overhead at one user (client latency minus the model time in
its Server-Timing header, from a sequential loop in this process), and PASS / MISS per target.
Extra `key=value` arguments go to `visionflow serve` (e.g. serve.max_batch_size=16).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project venv's scripts: visionflow, mlflow
LOCUSTFILE = Path(__file__).with_name("locustfile_serve.py")
TARGETS = {"throughput_x": 3.0, "p99_over_p50": 2.0, "overhead_p50_ms": 3.0}
_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


@dataclass
class Server:
    name: str  # "ours" or "mlflow"
    port: int
    infer_path: str
    ready_path: str
    body: bytes
    expect: str  # the output's name in a good response
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    notes: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A child in its own process group (so that stopping it stops what it started)."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _register(workdir: Path, logs: Path) -> dict:
    """The default pipeline into `workdir`; returns its summary (the last JSON line it prints)."""
    log = logs / "pipeline.log"
    print(f"registering: visionflow pipeline run workdir={workdir} (minutes; log {log})")
    proc = _spawn([str(BIN / "visionflow"), "pipeline", "run", f"workdir={workdir}"],
                  dict(os.environ), log)  # fmt: skip
    try:
        rc = proc.wait()
    finally:
        _stop(proc)
    if rc != 0:
        raise SystemExit(f"the pipeline run failed (rc {rc}):\n{_tail(log)}")
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"model_name"' in line:
            return json.loads(line)
    raise SystemExit(f"no summary line in {log}")


def _model(tracking_uri: str, ref: str) -> tuple[str, int, dict]:
    """(name, version, its pyfunc model config) for NAME or NAME/VERSION in the registry."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, version = ref.partition("/")
    if not version:
        found = client.search_model_versions(f"name = '{name}'")
        if not found:
            raise SystemExit(f"no versions of {name!r} in {tracking_uri}")
        version = str(max(int(v.version) for v in found))
    mv = client.get_model_version(name, version)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{name}/{mv.version}")
    config = info.flavors.get("python_function", {}).get("config") or {}
    return name, int(mv.version), config


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_ready(server: Server, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.proc.poll() is not None:
            raise SystemExit(
                f"{server.name} exited (rc {server.proc.returncode}) before it was ready; "
                f"{' '.join(server.cmd)}\n{_tail(server.log)}"
            )
        try:
            if _get(server.url + server.ready_path)[0] == 200:
                return time.monotonic() - start
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{server.name} not ready after {timeout:.0f}s:\n{_tail(server.log)}")


def _post(conn: http.client.HTTPConnection, server: Server) -> tuple[float, bytes, str]:
    """One request on a kept-alive connection: (client ms, body, Server-Timing header)."""
    start = time.perf_counter()
    conn.request("POST", server.infer_path, server.body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    ms = (time.perf_counter() - start) * 1000
    if resp.status != 200:
        raise SystemExit(f"{server.name}: HTTP {resp.status} {data[:300]!r}")
    return ms, data, resp.getheader("Server-Timing") or ""


def _logits(server: Server, data: bytes) -> np.ndarray:
    out = json.loads(data)
    if server.name == "ours":
        return np.asarray(out["outputs"][0]["data"], dtype=np.float64).ravel()
    return np.asarray(out["predictions"], dtype=np.float64).ravel()


def _sequential(server: Server, n: int, warmup: int = 20) -> dict:
    """`n` requests one after another on one connection; for ours, the server overhead each."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for _ in range(warmup):
            _post(conn, server)
        client, model, queue = [], [], []
        for _ in range(n):
            ms, _, timing = _post(conn, server)
            parts = {k: float(v) for k, v in _TIMING.findall(timing)}
            client.append(ms)
            if "model" in parts:
                model.append(parts["model"])
                queue.append(parts.get("queue", 0.0))
    finally:
        conn.close()
    out = {"requests": n, "client_p50_ms": statistics.median(client)}
    if len(model) == n:
        out["model_p50_ms"] = statistics.median(model)
        out["queue_p50_ms"] = statistics.median(queue)
        out["overhead_p50_ms"] = statistics.median(
            c - m for c, m in zip(client, model, strict=True)
        )
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, now."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _locust(server: Server, users: int, seconds: int, locust: Path, out: Path) -> dict:
    prefix = out / f"{server.name}_u{users}"
    env = {**os.environ, "BENCH_BODY": str(out / f"{server.name}.json"),
           "BENCH_PATH": server.infer_path, "BENCH_EXPECT": server.expect}  # fmt: skip
    cmd = [
        str(locust), "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
        "-t", f"{seconds}s", "--csv", str(prefix), "--host", server.url, "--reset-stats",
        "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    log = Path(f"{prefix}.log")
    server_cpu0 = _cpu_seconds(server.proc.pid)
    start = time.monotonic()
    proc = _spawn(cmd, env, log)
    locust_cpu = 0.0
    try:
        while proc.poll() is None:  # sample the client's CPU while it lives
            locust_cpu = max(locust_cpu, _cpu_seconds(proc.pid))
            time.sleep(0.5)
            if time.monotonic() - start > seconds + 120:
                raise SystemExit(f"locust ran past {seconds + 120}s:\n{_tail(log)}")
    finally:
        _stop(proc)
    wall = time.monotonic() - start
    server_cpu = _cpu_seconds(server.proc.pid) - server_cpu0
    stats = Path(f"{prefix}_stats.csv")
    if proc.returncode not in (0, 1) or not stats.exists():  # 1: some requests failed
        raise SystemExit(f"locust failed (rc {proc.returncode}): {' '.join(cmd)}\n{_tail(log)}")
    with open(stats, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    text = log.read_text(errors="replace")
    return {
        "server": server.name,
        "users": users,
        "requests": int(row["Request Count"]),
        "errors": int(row["Failure Count"]),
        "rps": float(row["Requests/s"]),
        "p50_ms": float(row["50%"] or "nan"),
        "p99_ms": float(row["99%"] or "nan"),
        "mean_ms": float(row["Average Response Time"] or "nan"),
        "client_cpu_pct": 100 * locust_cpu / wall,
        "server_cpu_pct": 100 * server_cpu / wall,
        "client_cpu_warning": "CPU usage" in text,
        "csv": str(stats),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, help="reuse this workdir's registry (else: a new one)")
    p.add_argument("--model", help="NAME or NAME/VERSION (default: the run's, or the latest)")
    p.add_argument("--variant", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--users", default="1,8,32", help="concurrent users per cell, comma-separated")
    p.add_argument("--seconds", type=int, default=25, help="load per cell (after the ramp)")
    p.add_argument("--sequential", type=int, default=300, help="requests in the 1-user loop")
    p.add_argument("--locust", type=Path, default=ROOT / ".venv-bench" / "bin" / "locust")
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--json", type=Path, help="results file (default: WORKDIR/bench-serve.json)")
    p.add_argument("settings", nargs="*", metavar="key=value", help="for visionflow serve")
    args = p.parse_args(argv)
    users_list = list(dict.fromkeys(int(u) for u in args.users.split(",")))  # no repeats
    if not args.locust.exists():
        raise SystemExit(f"no locust at {args.locust}: `make bench-serve` creates .venv-bench")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops servers

    from visionflow.host import describe_host, host_cpu

    fresh = args.workdir is None
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="visionflow-bench-serve-"))).resolve()
    logs = workdir / "bench-serve"
    logs.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    model_ref = args.model
    if fresh or not (workdir / "mlflow.db").exists():
        summary = _register(workdir, logs)
        tracking_uri = summary["tracking_uri"]
        model_ref = model_ref or f"{summary['model_name']}/{summary['model_version']}"
    name, version, config = _model(tracking_uri, model_ref or "visionflow-shapes")

    size = int(config.get("image_size", 32))
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    flat = [float(v) for v in image.ravel()]
    ours_body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(image.shape),
                             "data": flat}]}  # fmt: skip
    bodies = {"ours": ours_body, "mlflow": {"inputs": image.tolist()}}
    # PATH: `mlflow models serve` runs `uvicorn` by name, from the venv it was started from
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri}
    ours_port, mlflow_port = _free_port(), _free_port()
    servers = [
        Server(
            "ours", ours_port, f"/v2/models/{name}/versions/{version}/infer", "/v2/health/ready",
            json.dumps(bodies["ours"]).encode(), "logits",
            [str(BIN / "visionflow"), "serve", f"{name}/{version}", f"serve.variant={args.variant}",
             "serve.host=127.0.0.1", f"serve.port={ours_port}", f"tracking.uri={tracking_uri}",
             f"workdir={workdir}", *args.settings],
            env, logs / "ours.log",
        ),
        Server(
            "mlflow", mlflow_port, "/invocations", "/ping",
            json.dumps(bodies["mlflow"]).encode(), "predictions",
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}/{version}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(mlflow_port)],
            # the pyfunc's model config chooses the ONNX file; the scoring server reads overrides
            # of it from SERVING_MODEL_CONFIG (what `--model-config` would set; the CLI has none)
            {**env, "SERVING_MODEL_CONFIG": json.dumps({"variant": args.variant})},
            logs / "mlflow.log",
        ),
    ]  # fmt: skip
    for s in servers:
        (logs / f"{s.name}.json").write_bytes(s.body)

    cells: list[dict] = []
    try:
        for s in servers:
            s.proc = _spawn(s.cmd, s.env, s.log)
        for s in servers:
            s.notes["ready_s"] = round(_wait_ready(s, args.ready_timeout), 1)
        outs = {}
        for s in servers:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            try:
                outs[s.name] = _logits(s, _post(conn, s)[1])
            finally:
                conn.close()
        agree = float(np.abs(outs["ours"] - outs["mlflow"]).max())
        sequential = {s.name: _sequential(s, args.sequential) for s in servers}

        load_before = os.getloadavg()[0]
        print(f"host: {describe_host(host_cpu())}, {os.cpu_count()} CPUs, "
              f"load average {load_before:.2f} before the load")  # fmt: skip
        print(
            f"model: {name}/{version} from {tracking_uri}; variant {args.variant} on both "
            f"(registered default: {config.get('variant', '?')}); |logits ours - mlflow| max "
            f"{agree:.2g}" + ("" if agree < 1e-3 else "  <- NOT the same model file?")
        )
        print(f"ours: {' '.join(servers[0].cmd[1:])}")
        print(f"mlflow: SERVING_MODEL_CONFIG='{servers[1].env['SERVING_MODEL_CONFIG']}' "
              f"{' '.join(servers[1].cmd[1:])}")  # fmt: skip
        print(
            f"load: locust {args.locust.parent.parent.name} (1 process, FastHttpUser, no wait), "
            f"{args.seconds}s per cell after the ramp, one {list(image.shape)} image per request; "
            "client and servers share this machine's CPUs"
        )
        for i, users in enumerate(users_list):
            for s in servers if i % 2 == 0 else servers[::-1]:
                cell = _locust(s, users, args.seconds, args.locust, logs)
                cells.append(cell)
                print(f"  {s.name:<6} {users:>3} users: {cell['rps']:.1f} req/s, "
                      f"p50 {cell['p50_ms']:g} ms, p99 {cell['p99_ms']:g} ms, "
                      f"{cell['errors']} errors", flush=True)  # fmt: skip
    finally:
        for s in servers:
            _stop(s.proc)

    by = {(c["server"], c["users"]): c for c in cells}
    print()
    print(f"{'server':<7} {'users':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'requests':>8} {'client cpu':>10} {'server cpu':>10}")  # fmt: skip
    for s in servers:
        for users in users_list:
            c = by[(s.name, users)]
            print(
                f"{s.name:<7} {users:>5} {c['rps']:>8.1f} {c['p50_ms']:>7g} {c['p99_ms']:>7g} "
                f"{c['errors']:>6} {c['requests']:>8} {c['client_cpu_pct']:>9.0f}% "
                f"{c['server_cpu_pct']:>9.0f}%"
                + ("  (locust warned: CPU)" * c["client_cpu_warning"])
            )
    print(
        "(percentiles are locust's, rounded to whole ms below 100 ms; cpu: % of one core; "
        f"load average {os.getloadavg()[0]:.2f} after, other work on the machine counts)"
    )

    top = max(users_list)
    ratios = {f"throughput_x_{u}": by[("ours", u)]["rps"] / by[("mlflow", u)]["rps"]
              for u in users_list}  # fmt: skip
    ours_top = by[("ours", top)]
    ratios[f"ours_p99_over_p50_{top}"] = ours_top["p99_ms"] / ours_top["p50_ms"]
    seq = sequential["ours"]
    print()
    print("ours / mlflow throughput: " + ", ".join(
        f"{ratios[f'throughput_x_{u}']:.2f}x at {u}" for u in users_list))  # fmt: skip
    print(f"ours p99 / p50 at {top} users: {ratios[f'ours_p99_over_p50_{top}']:.2f}")
    if "overhead_p50_ms" in seq:
        print(
            f"ours at 1 user, {seq['requests']} sequential requests (http.client, this process; "
            f"locust does not read Server-Timing): client p50 {seq['client_p50_ms']:.2f} ms, "
            f"model p50 {seq['model_p50_ms']:.2f} ms, queue p50 {seq['queue_p50_ms']:.2f} ms, "
            f"server overhead p50 (client - model) {seq['overhead_p50_ms']:.2f} ms"
        )
    else:
        print("ours sent no Server-Timing model time: server overhead not measured")
    print(f"mlflow at 1 user, the same loop: client p50 "
          f"{sequential['mlflow']['client_p50_ms']:.2f} ms")  # fmt: skip

    ours_requests = sum(by[("ours", u)]["requests"] for u in users_list)
    ours_errors = sum(by[("ours", u)]["errors"] for u in users_list)
    overhead = seq.get("overhead_p50_ms", float("nan"))
    targets = [
        (f"{top} users: ours >= {TARGETS['throughput_x']:g}x mlflow's throughput",
         ratios[f"throughput_x_{top}"] >= TARGETS["throughput_x"],
         f"{ratios[f'throughput_x_{top}']:.2f}x"),
        (f"{top} users: ours p99 <= {TARGETS['p99_over_p50']:g}x ours p50",
         ratios[f"ours_p99_over_p50_{top}"] <= TARGETS["p99_over_p50"],
         f"{ours_top['p99_ms']:g} / {ours_top['p50_ms']:g} ms = "
         f"{ratios[f'ours_p99_over_p50_{top}']:.2f}x"),
        ("ours: no errors (every cell)", ours_errors == 0,
         f"{ours_errors} of {ours_requests} requests"),
        (f"1 user: ours server overhead p50 <= {TARGETS['overhead_p50_ms']:g} ms",
         overhead <= TARGETS["overhead_p50_ms"], f"{overhead:.2f} ms"),
    ]  # fmt: skip
    print("\ntargets:")
    for what, ok, figure in targets:
        print(f"  {'PASS' if ok else 'MISS'}  {what:<48} {figure}")

    result = {
        "host": describe_host(host_cpu()), "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "model": f"{name}/{version}", "tracking_uri": tracking_uri, "variant": args.variant,
        "registered_variant": config.get("variant"), "logits_max_abs_diff": agree,
        "ours_settings": args.settings, "seconds": args.seconds,
        "servers": {s.name: {"url": s.url, "cmd": s.cmd, **s.notes} for s in servers},
        "cells": cells, "sequential": sequential, "ratios": ratios,
        "targets": [{"target": w, "pass": ok, "figure": f} for w, ok, f in targets],
    }  # fmt: skip
    out = args.json or workdir / "bench-serve.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out} (logs and locust CSVs: {logs})")


if __name__ == "__main__":
    main()
