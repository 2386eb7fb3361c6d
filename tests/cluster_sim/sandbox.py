"""A pod's filesystem view for a local process: its own directory, its mounts, nothing else.

On a cluster each pod has its own root filesystem, an empty working directory, its own /tmp,
the files its volumes mount (ConfigMaps, the service-account token) and nothing of the other
pods' disks. Here a pod is a process in its own mount namespace (`unshare --mount`, as root):

- the pod's directory (on the host: `<pod_dir>`) is its only writable place, seen at POD_VIEW;
  its `work/` is the working directory and HOME, its `tmp/` is /tmp;
- /run (= /var/run) is a fresh tmpfs holding exactly the files its volumes mount there
  (`<pod_dir>/files/run/...`: the service account, a ConfigMap), and /dev/shm a fresh tmpfs of the
  emptyDir's size where the pod asks for one;
- the simulation's directory (all pods' directories) is hidden under an empty tmpfs;
- every other filesystem is read-only, so a write outside the pod's own directory fails loudly
  (a real pod may write to its container layer; a step that does is a bug here).

The process keeps root (the venv's interpreter lives under /root, which the images' user 10001
could not read) but cannot see or change anything it should not.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

POD_VIEW = "/run/vf-pod"

_SCRIPT = r"""
pod=$1; hide=$2; shm=$3; keep=$4; shift 4
mount -t tmpfs -o mode=0755,size=64m vf-run /run
cp -a "$pod/files/run/." /run/
mkdir -p /run/vf-pod
mount --bind "$pod" /run/vf-pod
# The pod's own /tmp; the code it runs stays visible where it lives under /tmp (a checkout).
i=0; IFS=:; for k in $keep; do
  case "$k" in /tmp/*) mkdir -p "/run/vf-keep/$i"; mount --bind "$k" "/run/vf-keep/$i" ;; esac
  i=$((i+1)); done; unset IFS
mount --bind "$pod/tmp" /tmp
i=0; IFS=:; for k in $keep; do
  case "$k" in /tmp/*) mkdir -p "$k"; mount --bind "/run/vf-keep/$i" "$k" ;; esac
  i=$((i+1)); done; unset IFS
if [ -n "$shm" ]; then mount -t tmpfs -o "size=$shm" vf-shm /dev/shm; fi
if [ -d "$hide" ]; then mount -t tmpfs -o size=1m,mode=0555 vf-hidden "$hide"; fi
# Everything else read-only (each mount point, deepest last so none is skipped).
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do
  case "$m" in
    /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/run|/run/*|/tmp|"$hide") ;;
    *) mount -o remount,bind,ro "$m" 2>/dev/null || true ;;
  esac
done
cd /run/vf-pod/work
exec "$@"
"""
# What a pod runs: this checkout (configs, tests.cluster_sim) and the interpreter's environment.
CODE = (str(Path(__file__).resolve().parents[2]), sys.prefix)


class SandboxUnavailable(RuntimeError):
    """Mount namespaces cannot be made here (not root, or no `unshare`); the message says why."""


def check() -> None:
    if os.geteuid() != 0:
        raise SandboxUnavailable("pods need their own mount namespace: run as root")
    if not shutil.which("unshare"):
        raise SandboxUnavailable("`unshare` (util-linux) is not installed")


def prepare(pod_dir: Path, files: dict[str, bytes | str]) -> None:
    """Make a pod's empty directory, with `files` (absolute paths under /run or /var/run)."""
    for sub in ("work", "tmp", "files/run"):
        (pod_dir / sub).mkdir(parents=True, exist_ok=True)
    (pod_dir / "tmp").chmod(0o1777)
    for path, content in files.items():
        rel = _under_run(path)
        target = pod_dir / "files" / "run" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)


def _under_run(path: str) -> str:
    for prefix in ("/var/run/", "/run/"):
        if path.startswith(prefix):
            return path[len(prefix) :]
    raise ValueError(
        f"the simulation mounts files only under /var/run or /run, not {path}: "
        "choose a mount path there"
    )


def wrap(pod_dir: Path, argv: list[str], *, hide: Path, shm_size: str | None = None) -> list[str]:
    """The command that runs `argv` as the pod at `pod_dir` (see the module docstring)."""
    shm = str(quantity_bytes(shm_size)) if shm_size else ""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", _SCRIPT,
            "sh", str(pod_dir), str(hide), shm, ":".join(CODE), *argv]  # fmt: skip


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`2Gi`, `512M`, `1000`) in bytes."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kMGT]i?|)", str(quantity).strip())
    if not m:
        raise ValueError(f"not a Kubernetes memory quantity: {quantity!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
