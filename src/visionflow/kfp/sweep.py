"""Sweeps: `visionflow pipeline run|submit -m key=a,b ...`, one pipeline run per combination.

Overrides are read by Hydra's own override parser, with its quoting, and expanded as Hydra's
BasicSweeper expands them: every combination of the discrete sweeps (`a,b`, `choice(a,b)`,
`range(start,stop[,step])`, `group=glob(pattern)`), the first swept key varying slowest. Each
run carries the other overrides as given, `sweep.id=<id>` and `run_id=<id>-<n>` (n from 1).

`run` runs the combinations one after another on this machine (kfp.local); a failed run is
reported and the others still run. `submit` starts one KFP run per combination, named
`<id>-<n>`, in one experiment. Either way each run's MLflow run is a child of the sweep's
parent run (visionflow.tracking), and every combination's config is checked before any starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow.core.config import ConfigError

log = logging.getLogger("visionflow.sweep")

SWEEP_KEY = "sweep.id"
MAX_RUNS = 100  # more is almost always a typo (range(0,1000)); split a real one into sweeps
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # run ids name paths and KFP/K8s objects
SWEEP_FORMS = "key=a,b, key=choice(a,b), key=range(start,stop[,step]) or group=glob(pattern)"


INTERRUPTED = "interrupted (Ctrl-C): the sweep stopped here"


class SweepError(ConfigError):
    """A sweep that cannot start; the message names the override and why."""


@dataclass(frozen=True)
class SweepRun:
    n: int  # from 1
    run_id: str  # <sweep id>-<n>: the visionflow run id and the KFP run's name
    values: dict[str, str]  # swept key -> this run's value, as an override value
    overrides: list[str]  # everything the run is given, sweep.id= and run_id= included


@dataclass(frozen=True)
class Sweep:
    id: str
    keys: list[str]  # the swept keys, in the order given
    runs: list[SweepRun]


@dataclass
class Outcome:
    """What became of one run: a summary (run) or a KFP run (submit), or an error."""

    run: SweepRun
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def new_sweep_id() -> str:
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def expand(overrides: list[str], sweep_id: str | None = None) -> Sweep:
    """The runs of a sweep: one per combination of the sweep overrides.

    Raises SweepError for a malformed override, a sweep that cannot be enumerated or is empty,
    no sweep at all, `run_id=`, a key given twice with a sweep, or a bad `sweep.id`.
    """
    parsed = _parse(overrides)
    given: list[tuple[str, bool]] = []  # per position: (override as given, False) or (key, True)
    swept: dict[str, list[str]] = {}
    names = [o.key_or_group for _, o, _ in parsed]
    for text, o, values in parsed:
        name = o.key_or_group
        if name == "run_id":
            raise SweepError(
                f"{text!r}: a sweep names its runs <sweep id>-<n>; leave out run_id= (set "
                f"{SWEEP_KEY}=NAME to choose the prefix)"
            )
        if values is None and name == SWEEP_KEY:
            sweep_id = str(o.value() or "") or None
        elif values is None:
            given.append((text, False))
        elif name == SWEEP_KEY:
            raise SweepError(f"{text!r}: {SWEEP_KEY} names the whole sweep; it cannot be swept")
        elif not values:
            raise SweepError(f"{text!r}: the sweep has no values")
        elif names.count(name) > 1:
            raise SweepError(f"{name} is swept and given more than once: give it once")
        else:
            swept[o.get_key_element()] = values
            given.append((o.get_key_element(), True))
    if not swept:
        raise SweepError(
            f"-m runs a sweep, and no override is one: sweep with {SWEEP_FORMS} "
            f"(got: {' '.join(overrides) or 'no overrides'})"
        )
    combos = list(itertools.product(*swept.values()))
    if len(combos) > MAX_RUNS:
        raise SweepError(
            f"the sweep has {len(combos)} runs, more than {MAX_RUNS}: narrow it, or split it "
            "into several sweeps"
        )
    sweep_id = _check_sweep_id(sweep_id or new_sweep_id(), len(combos))
    runs = []
    for n, combo in enumerate(combos, start=1):
        values = dict(zip(swept, combo, strict=True))
        run_id = f"{sweep_id}-{n}"
        fixed = [f"{text}={values[text]}" if is_swept else text for text, is_swept in given]
        overrides_n = [*fixed, f"{SWEEP_KEY}={sweep_id}", f"run_id={run_id}"]
        runs.append(SweepRun(n, run_id, values, overrides_n))
    return Sweep(sweep_id, list(swept), runs)


def _parse(overrides: list[str]) -> list[tuple[str, Any, list[str] | None]]:
    """(override, Hydra's Override, its values if a sweep) for each override, in order.

    Parsed within the configs' Hydra context, so that glob() can list a group's options.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from visionflow.core.config import config_dir

    out = []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        for text in overrides:
            try:
                (o,) = parser.parse_overrides([text])
            except HydraException as err:
                why = str(err).split("\nSee https://hydra.cc")[0].replace("\n", " ")
                raise SweepError(f"malformed override {text!r}: {why}") from None
            if o.is_interval_sweep():
                raise SweepError(
                    f"{text!r}: interval() is a continuous range that cannot be enumerated; "
                    f"sweep with {SWEEP_FORMS}"
                )
            values = None
            if o.is_sweep_override():
                try:  # materialised once: shuffle() draws its order here
                    values = list(o.sweep_string_iterator())
                except HydraException as err:
                    raise SweepError(f"{text!r}: {err}") from None
            out.append((text, o, values))
    return out


def _check_sweep_id(sweep_id: str, runs: int) -> str:
    longest = f"{sweep_id}-{runs}"
    if not DNS_LABEL.fullmatch(sweep_id) or len(longest) > 63:
        raise SweepError(
            f"{SWEEP_KEY}={sweep_id!r} cannot name runs like {longest!r}: run ids are DNS-1123 "
            "labels (lower-case letters, digits and '-', starting and ending with a letter or "
            "digit, at most 63 characters)"
        )
    return sweep_id


def check_configs(sweep: Sweep) -> None:
    """Compose and validate every run's config; the first that fails is named."""
    from visionflow.compose.validation import validate
    from visionflow.core.config import load_config
    from visionflow.core.registry import UnknownNameError

    for run in sweep.runs:
        try:
            validate(load_config(run.overrides))
        except (ConfigError, UnknownNameError) as err:
            raise SweepError(f"run {run.run_id} ({_describe(run)}): {err}") from None


def run_locally(sweep: Sweep, run: Callable | None = None) -> list[Outcome]:
    """Run the sweep's pipelines one after another; a failure is recorded and the next starts.

    `run` is kfp/local.run_local unless given (tests). Ctrl-C ends the sweep: the run it
    stopped is recorded as INTERRUPTED and no other starts.
    """
    if run is None:
        from visionflow.kfp.local import run_local as run
    outcomes = []
    for r in sweep.runs:
        log.info("sweep %s: run %d of %d, %s: %s", sweep.id, r.n, len(sweep.runs), r.run_id,
                 _describe(r))  # fmt: skip
        try:
            summary, _ = run(r.overrides)
            outcomes.append(Outcome(r, summary))
        except KeyboardInterrupt:
            outcomes.append(Outcome(r, error=INTERRUPTED))
            break
        except Exception as err:  # noqa: BLE001  (one run's failure is reported, the sweep goes on)
            log.error("sweep %s: run %s failed: %s", sweep.id, r.run_id, err)
            outcomes.append(Outcome(r, error=f"{type(err).__name__}: {err}"))
    return outcomes


def submit_all(sweep: Sweep, submit_one: Callable[[SweepRun], Any]) -> list[Outcome]:
    """Start every run through `submit_one(run) -> SubmitResult`.

    The first submission uploads the package: if it fails, nothing started, and the error is
    raised. A later failure is recorded and the other runs are still submitted.
    """
    outcomes = []
    for r in sweep.runs:
        try:
            result = submit_one(r)
        except Exception as err:
            if not outcomes:
                raise
            log.error("sweep %s: run %s was not started: %s", sweep.id, r.run_id, err)
            outcomes.append(Outcome(r, error=f"{type(err).__name__}: {err}"))
            continue
        outcomes.append(Outcome(r, dataclasses.asdict(result)))
    return outcomes


# ---- reporting ----


def records(sweep: Sweep, outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The JSON list printed on stdout: each run's summary (or KFP run), with its sweep values."""
    out = []
    for o in outcomes:
        status = {"status": "failed", "error": o.error} if o.error else {"status": "succeeded"}
        out.append({**o.result, "sweep_id": sweep.id, "sweep_run": o.run.run_id,
                    "sweep_values": o.run.values, **status})  # fmt: skip
    return out


def run_table(sweep: Sweep, outcomes: list[Outcome], champions: set | None = None) -> str:
    """One row per run: swept values, main metric, model version, champion, status.

    `champions`: the (model name, version) pairs that hold the alias now; without it, what each
    run's register step decided.
    """
    header = ["run", *sweep.keys, "metric", "version", "champion", "status"]
    rows = []
    for o in outcomes:
        s = o.result
        metric = next((k for k in s if k.startswith("test_")), None)
        if o.error:
            cells = ["-", "-", "-", "failed: " + _first_line(o.error)]
        else:
            held = s.get("champion")
            if champions is not None:
                held = (s.get("model_name"), s.get("model_version")) in champions
            score = s.get(metric) if metric else None
            cells = [f"{metric.removeprefix('test_')} {score:.4f}" if score is not None else "-",
                     str(s.get("model_version", "-")), "yes" if held else "no", "ok"]  # fmt: skip
        rows.append([o.run.run_id, *(o.run.values[k] for k in sweep.keys), *cells])
    failed = sum(1 for o in outcomes if o.error)
    title = f"sweep {sweep.id}: {len(outcomes)} of {len(sweep.runs)} runs, {failed} failed"
    return title + "\n" + _table(header, rows)


def submit_table(sweep: Sweep, outcomes: list[Outcome], experiment: str) -> str:
    header = ["run", *sweep.keys, "kfp run", "state"]
    rows = [[o.run.run_id, *(o.run.values[k] for k in sweep.keys),
             o.result.get("run_id", "-"),
             "not started: " + _first_line(o.error) if o.error else o.result.get("state", "")]
            for o in outcomes]  # fmt: skip
    failed = sum(1 for o in outcomes if o.error)
    title = (f"sweep {sweep.id}: {len(outcomes) - failed} of {len(sweep.runs)} runs started "
             f"in experiment '{experiment}'")  # fmt: skip
    return title + "\n" + _table(header, rows)


def current_champions(outcomes: list[Outcome]) -> set | None:
    """(model name, version) of each champion alias the sweep's models have now, or None if
    the registry cannot be asked."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionflow.steps.register import CHAMPION

    held = set()
    names = {(o.result["tracking_uri"], o.result["model_name"])
             for o in outcomes if not o.error and "model_name" in o.result}  # fmt: skip
    try:
        for uri, name in names:
            try:
                v = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias(name, CHAMPION)
                held.add((name, int(v.version)))
            except MlflowException as err:
                if "not found" not in str(err):  # no such model or alias is an answer
                    raise
    except Exception as err:  # noqa: BLE001  (the table falls back on each run's own decision)
        log.warning("could not ask the registry which version is champion now: %s", err)
        return None
    return held


def _describe(r: SweepRun) -> str:
    return " ".join(f"{k}={v}" for k, v in r.values.items())


def _first_line(text: str, width: int = 100) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


# ---- the CLI ----


def cli_run(overrides: list[str]) -> int:
    """`visionflow pipeline run -m ...`: table on stderr, JSON list on stdout; 1 if any failed."""
    sweep = expand(overrides)
    check_configs(sweep)
    log.info("sweep %s: %d runs over %s", sweep.id, len(sweep.runs), ", ".join(sweep.keys))
    outcomes = run_locally(sweep)
    print(run_table(sweep, outcomes, current_champions(outcomes)), file=sys.stderr)
    print(json.dumps(records(sweep, outcomes)))
    if any(o.error == INTERRUPTED for o in outcomes):
        return 130
    return 1 if any(o.error for o in outcomes) else 0


def cli_submit(args) -> int:
    """`visionflow pipeline submit -m ...`: one KFP run per combination, in one experiment."""
    import tempfile

    from visionflow.kfp.compile import compile_pipeline
    from visionflow.kfp.submit import params_from_overrides, submit

    if args.run_name:
        raise SweepError(f"--run-name with -m: runs are named <sweep id>-<n>; set {SWEEP_KEY}="
                         "NAME to choose the prefix")  # fmt: skip
    if args.wait:
        raise SweepError("--wait follows one run; a sweep's runs go side by side: follow them "
                         f"in the Kubeflow UI, experiment '{args.experiment}'")  # fmt: skip
    sweep = expand(args.overrides)
    check_configs(sweep)  # a bad combination fails here, before any run starts

    with tempfile.TemporaryDirectory() as tmp:
        package = (
            Path(args.package) if args.package else compile_pipeline(Path(tmp) / "training.yaml")
        )

        def submit_one(r: SweepRun):
            return submit(
                args.host, package, args.name, args.experiment, r.run_id,
                params_from_overrides(r.overrides), timeout_s=args.timeout,
                namespace=args.namespace, service_account=args.service_account,
            )  # fmt: skip

        outcomes = submit_all(sweep, submit_one)
    print(submit_table(sweep, outcomes, args.experiment), file=sys.stderr)
    print(json.dumps(records(sweep, outcomes)))
    return 1 if any(o.error for o in outcomes) else 0
