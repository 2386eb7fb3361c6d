"""Pods as separate hosts: one Linux network namespace and one IP per pod, on this machine.

`PodNetwork` gives each simulated pod its own network namespace with `lo` and an `eth0` on a
private /24, so a Worker reaches the Master at another address (a real TCP hop between network
stacks, not loopback), and `isolate_port` plays a NetworkPolicy on the rendezvous port.

Layout (nothing is added to the host's own network namespace: no link, address or route):

    <inst>_switch     a namespace holding only the bridge br0 and one veth end per pod (p<N>)
    <inst>-<pod>      one namespace per pod: lo, and eth0 (the veth's other end) = 10.231.X.<n>/24

    <inst> = vfsim-<owner pid>-<owner start time>-<4 hex>: unique per instance, and it names the
    owning process, so a later instance deletes the namespaces of an owner that is gone (a run
    killed by SIGKILL cannot clean up after itself).

Because the bridge lives in its own namespace, the host's firewall (Docker's FORWARD DROP with
br_netfilter, for instance) never sees pod traffic, and the subnet cannot clash with the host's
routes or with another instance: each instance is its own L2 segment that nothing routes to. X is
still random, so that addresses in the logs of parallel runs look different.

Host services (moto S3, mlflow, the stand-in API server) listen on the host's 127.0.0.1, and pods
are configured with those 127.0.0.1 URLs. `expose_host_ports` opens, inside every pod's
namespace, a listening socket on 127.0.0.1:<port>, and relays each connection to the host's
127.0.0.1:<port>. A socket belongs to the namespace of the thread that created it, whatever
thread uses it later: a short-lived thread enters the pod's namespace (setns(2) through ctypes,
as Python 3.11 has no os.setns), creates the socket and exits, and one asyncio thread in the host
namespace serves every relay. No extra process, no iptables DNAT + route_localnet, and the relays
go away with the process that owns the PodNetwork.

Processes: `wrap(pod, argv)` returns `ip netns exec <ns> unshare --uts -- sh -c 'hostname <pod>
&& mount --bind <hosts> /etc/hosts && exec "$@"' ... argv`. Every step execs, so the pid of the
Popen is the pod's program itself. Like on Kubernetes, the pod's hostname is the pod's name, and
its /etc/hosts (bind-mounted in the private mount namespace `ip netns exec` makes; the host's
file is untouched) maps it to the pod's IP, and every other pod's name to theirs, as the
Training Operator's headless services do through cluster DNS. This matters: gloo resolves the
hostname to choose the address it announces to its peers, and the host's hostname resolves to
127.0.0.1 here, which makes the Master announce its loopback to the Workers ("Gloo
connectFullMesh failed ... remote=[127.0.0.1]").

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), iproute2 (`ip`), util-linux (`unshare`), `mount`,
`hostname` and `sh`; `isolate_port` also needs `nft` (Debian package nftables) or
`iptables-restore` (package iptables). What is missing raises `NamespacesUnavailable`, whose
message is the reason to skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

PREFIX = "vfsim"
NETNS_DIR = Path("/run/netns")  # where `ip netns add` binds the namespaces
HOSTS_DIR = Path("/run") / PREFIX  # <instance>/hosts: the pods' /etc/hosts
SUBNET_PREFIX = "10.231"
CLONE_NEWNET = 0x40000000
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1123 label, as pods
_OURS = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-[0-9a-f]{{4}}(?:[-_]|$)")
_T = TypeVar("_T")


class NamespacesUnavailable(RuntimeError):
    """This machine cannot make pod namespaces (a tool or a privilege is missing): skip.

    str(exc) is the reason, naming what is missing and how to get it."""


class ConnectFailure(str):
    """Why `can_connect` failed ("refused", "timeout", or "<error>: <message>"). It is falsy,
    so `if net.can_connect(...)` and `assert net.can_connect(...)` read as expected."""

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class PodAddress:
    namespace: str  # the network namespace's name: /run/netns/<namespace>
    ip: str  # the address of the pod's eth0


@dataclass
class _Member:
    name: str
    address: PodAddress
    outsider: bool


# --- small helpers ---------------------------------------------------------------------------


def _run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run a tool; on failure raise RuntimeError naming the command and its stderr."""
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as exc:
        raise NamespacesUnavailable(f"{argv[0]} is not installed: {exc}") from exc
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def _process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid, it names a process
    even after the pid is reused. None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


_setns_func: Callable[[int, int], None] | None = None


def _setns(fd: int, nstype: int) -> None:
    global _setns_func
    if _setns_func is None:
        if hasattr(os, "setns"):  # Python >= 3.12
            _setns_func = os.setns
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

            def libc_setns(fd: int, nstype: int) -> None:
                if libc.setns(fd, nstype) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns: {os.strerror(err)}")

            _setns_func = libc_setns
    _setns_func(fd, nstype)


def in_netns(namespace: str, fn: Callable[[], _T]) -> _T:
    """Return fn() run in a new thread that has joined network namespace `namespace`.

    setns(2) moves only the calling thread, and that thread ends with fn: the caller's threads
    stay in their namespace. Sockets fn creates stay in `namespace` whichever thread uses them.
    """
    result: list = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{namespace}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _write_sysctl(key: str, value: str) -> None:
    """Write /proc/sys/<key>, for the namespace of the calling thread; a no-op where the key
    does not exist (a kernel without IPv6)."""
    path = Path("/proc/sys") / key
    if path.exists():
        path.write_text(value)


def _netns_pids(namespace: str) -> list[int]:
    out = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_all(pids: list[int], grace: float) -> None:
    """SIGTERM, then SIGKILL what is still alive after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _delete_namespaces(namespaces: list[str], grace: float) -> list[str]:
    """Kill the processes left in the namespaces (SIGTERM, SIGKILL after `grace` s), delete
    the namespaces; return the errors. Their links go with them (deleting a veth end deletes
    its peer)."""
    present = [ns for ns in namespaces if (NETNS_DIR / ns).exists()]
    _kill_all([pid for ns in present for pid in _netns_pids(ns)], grace)
    errors = []
    for ns in present:
        proc = subprocess.run(
            ["ip", "netns", "delete", ns], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 and (NETNS_DIR / ns).exists():
            errors.append(f"`ip netns delete {ns}` exited {proc.returncode}: {proc.stderr.strip()}")
    return errors


def clean_stale() -> list[str]:
    """Delete the namespaces (and hosts files) of instances whose owner process is gone,
    killing what still runs in them; return their names. Those of live owners, in this process
    or another, are left alone. What cannot be deleted is warned about, not raised: names are
    unique per instance, so a leftover does not stand in the way of a new instance."""
    names: set[str] = set()
    for directory in (NETNS_DIR, HOSTS_DIR):
        with contextlib.suppress(OSError):
            names.update(p.name for p in directory.iterdir() if _OURS.match(p.name))
    stale = []
    for name in sorted(names):
        match = _OURS.match(name)
        assert match is not None
        if _process_start_time(int(match[1])) != int(match[2]):
            stale.append(name)
    errors = _delete_namespaces(stale, grace=0.5)
    for name in stale:
        shutil.rmtree(HOSTS_DIR / name, ignore_errors=True)
    if errors:
        warnings.warn("stale pod namespaces left: " + "; ".join(errors), stacklevel=2)
    return stale


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NamespacesUnavailable(f"{name} is not installed (see check_host)")
    return path


def firewall_tool() -> str:
    """The tool `isolate_port` will use: "nft" or "iptables-restore"; NamespacesUnavailable
    when neither is installed."""
    for tool in ("nft", "iptables-restore"):
        if shutil.which(tool):
            return tool
    raise NamespacesUnavailable(
        "isolate_port needs nft or iptables-restore, and neither is installed: "
        "apt-get install -y nftables (or iptables)"
    )


def check_host() -> None:
    """Raise NamespacesUnavailable unless this process can make pod namespaces."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        raise NamespacesUnavailable("network namespaces need Linux (/proc/self/ns/net missing)")
    missing = [t for t in ("ip", "unshare", "mount", "hostname", "sh") if not shutil.which(t)]
    if missing:
        raise NamespacesUnavailable(
            f"missing tools: {', '.join(missing)} "
            "(Debian packages iproute2, util-linux, mount, hostname)"
        )
    caps = _effective_caps()
    lacking = [
        name
        for bit, name in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN"))
        if not caps >> bit & 1
    ]
    if lacking:
        raise NamespacesUnavailable(
            f"network namespaces need root: this process (uid {os.geteuid()}) lacks "
            f"{' and '.join(lacking)}"
        )


# --- relays from a pod's 127.0.0.1:<port> to the host's ---------------------------------------


class _Relay:
    """One asyncio loop, in a thread in the host namespace, serving listening sockets made in
    pod namespaces: each accepted connection is piped to the host's 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vfsim-relay")
        self._thread.daemon = True
        self._thread.start()

    def serve(self, listener: socket.socket, port: int) -> asyncio.Server:
        """Relay the connections `listener` accepts; the server owns (and closes) it."""

        async def start() -> asyncio.Server:
            server = await asyncio.start_server(
                lambda r, w: self._handle(port, r, w), sock=listener, limit=1 << 20
            )
            self._servers.append(server)
            return server

        return asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)

    def stop(self, servers: list[asyncio.Server]) -> None:
        """Stop listening on these servers' sockets (the connections they relay go on)."""

        async def stop() -> None:
            for server in servers:
                server.close()
                self._servers.remove(server)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)

    async def _handle(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:  # nothing listens on the host's port: the pod sees a reset
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other side sees EOF, may still answer
        except (ConnectionError, OSError):
            writer.transport.abort()

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for server in self._servers:
                await server.wait_closed()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


def _listen_loopback(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


# --- the network -------------------------------------------------------------------------------


class PodNetwork:
    """Network namespaces for the pods of a simulated cluster; see the module's docstring.

    with PodNetwork() as net:
        master = net.add_pod("job-master-0")
        net.expose_host_ports([s3_port, mlflow_port])
        net.isolate_port("job-master-0", 29500, ["job-worker-0"])
        subprocess.Popen(net.wrap("job-master-0", argv), env={..., "MASTER_ADDR": master.ip})

    Thread-safe. Leaving the `with` (also on an error or Ctrl-C) stops the relays, kills the
    processes left in the pods' namespaces and deletes every namespace it made.
    """

    def __init__(self) -> None:
        pid = os.getpid()
        self.instance = f"{PREFIX}-{pid}-{_process_start_time(pid)}-{secrets.token_hex(2)}"
        self.switch = f"{self.instance}_switch"
        self.subnet = ipaddress.ip_network(f"{SUBNET_PREFIX}.{random.randint(1, 254)}.0/24")
        self._hosts = iter(list(self.subnet.hosts())[1:])  # .1 stays free, as for a gateway
        self._members: dict[str, _Member] = {}
        self._ports: list[int] = []  # host ports exposed in every pod
        self._listeners: dict[str, list[asyncio.Server]] = {}  # by namespace
        self._rules: dict[str, dict[int, tuple[list[str], str]]] = {}
        self._relay: _Relay | None = None
        self._lock = threading.RLock()
        self._started = False
        self._veths = 0
        self.hosts_file = HOSTS_DIR / self.instance / "hosts"

    # lifecycle

    def start(self) -> PodNetwork:
        """Check the host, delete stale instances' namespaces, make the switch namespace."""
        if self._started:
            raise RuntimeError(f"PodNetwork {self.instance} is already started")
        check_host()
        clean_stale()
        self._started = True
        try:
            self._add_namespace(self.switch)
            try:
                _run(
                    ["ip", "-n", self.switch, "-batch", "-"],
                    stdin="link set lo up\n"
                    "link add br0 type bridge\n"
                    "link set br0 up\n"
                    # fail here, not at the first pod, where veth is missing
                    "link add probe0 type veth peer name probe1\n"
                    "link delete probe0\n",
                )
            except RuntimeError as exc:
                raise NamespacesUnavailable(f"cannot make a bridge and veths: {exc}") from exc
            self._relay = _Relay()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the relays, delete every namespace (killing the processes left in them)."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            if self._relay is not None:
                self._relay.close()  # closes every listener
            self._listeners.clear()
            namespaces = [m.address.namespace for m in self._members.values()]
            errors = _delete_namespaces([*namespaces, self.switch], grace=2.0)
            self._members.clear()
            shutil.rmtree(self.hosts_file.parent, ignore_errors=True)
            with contextlib.suppress(OSError):  # not empty: another instance uses it
                HOSTS_DIR.rmdir()
            if errors:
                raise RuntimeError("PodNetwork cleanup: " + "; ".join(errors))

    def __enter__(self) -> PodNetwork:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # pods

    def add_pod(self, name: str) -> PodAddress:
        """A namespace for pod `name` (an RFC 1123 label): lo up, and eth0 on the subnet."""
        return self._add_member(name, outsider=False)

    def add_outsider(self, name: str) -> PodAddress:
        """A namespace on the same subnet for something outside the job (another tenant's pod):
        what `isolate_port` must keep out."""
        return self._add_member(name, outsider=True)

    def address(self, name: str) -> PodAddress:
        return self._member(name).address

    def wrap(self, pod_name: str, argv: list[str]) -> list[str]:
        """The command that runs argv in the pod's namespace, with hostname = pod_name.

        Each step execs the next: a Popen of it has argv's program as its pid. The environment
        and the working directory pass through unchanged; the tools are named by absolute
        path, so an `env` without PATH still finds them (argv[0] itself is looked up in the
        env's PATH, or /bin:/usr/bin without one)."""
        member = self._member(pod_name)
        ip, unshare, sh, hostname, mount = map(_tool, ("ip", "unshare", "sh", "hostname", "mount"))
        script = '"$1" "$0" && "$2" --bind "$3" /etc/hosts && shift 3 && exec "$@"'
        return [
            ip, "netns", "exec", member.address.namespace,  # also a private mount namespace
            unshare, "--uts", "--",
            sh, "-c", script, pod_name, hostname, mount, str(self.hosts_file),
            *argv,
        ]  # fmt: skip

    def expose_host_ports(self, ports: Iterable[int]) -> None:
        """Make the host's 127.0.0.1:<port> reachable at 127.0.0.1:<port> inside every pod and
        outsider, present and future. A pod's connection is accepted before the host's side is
        tried: when nothing listens there, the pod's connection is reset."""
        with self._lock:
            self._require_started()
            new = [int(p) for p in ports if int(p) not in self._ports]
            for member in self._members.values():
                self._listen(member, new)
            self._ports.extend(new)

    def isolate_port(
        self,
        pod_name: str,
        port: int,
        allowed_pods: Iterable[str],
        *,
        action: Literal["reject", "drop"] = "reject",
    ) -> None:
        """A NetworkPolicy on one port: TCP to `port` of `pod_name` is let in only from the
        allowed pods' addresses (and from the pod itself, which Kubernetes never blocks).

        action="reject" (the default) answers the others' SYN with a TCP RST: they get
        ECONNREFUSED at once. Real CNIs (Calico, Cilium, ...) mostly DROP instead: silence
        tells a scanner nothing and costs the node no reply, and the client waits out its
        connect timeout. We refuse by default so that a test of the policy, and a
        misconfigured rendezvous, fail in milliseconds rather than after a timeout; pass
        action="drop" to see what a real cluster does. Calling it again for the same pod and
        port replaces the rule. Raises NamespacesUnavailable without nft or iptables."""
        if action not in ("reject", "drop"):
            raise ValueError(f"action must be 'reject' or 'drop', not {action!r}")
        tool = firewall_tool()
        with self._lock:
            target = self._member(pod_name)
            ips = [self._member(p).address.ip for p in allowed_pods]
            rules = self._rules.setdefault(pod_name, {})
            rules[int(port)] = (ips, action)
            if tool == "nft":
                _run(
                    ["ip", "netns", "exec", target.address.namespace, "nft", "-f", "-"],
                    stdin=_nft_ruleset(rules),
                )
            else:
                _run(
                    ["ip", "netns", "exec", target.address.namespace, "iptables-restore"],
                    stdin=_iptables_ruleset(rules),
                )

    def can_connect(
        self, from_pod: str, ip: str, port: int, timeout: float = 2.0
    ) -> bool | ConnectFailure:
        """Try a TCP connection to ip:port from the namespace of `from_pod` (a pod or an
        outsider): True, or a falsy ConnectFailure: "refused", "timeout" or "<error>: <why>"."""
        namespace = self._member(from_pod).address.namespace

        def attempt() -> bool | ConnectFailure:
            try:
                with socket.create_connection((ip, port), timeout=timeout):
                    return True
            except ConnectionRefusedError:
                return ConnectFailure("refused")
            except TimeoutError:
                return ConnectFailure("timeout")
            except OSError as exc:
                return ConnectFailure(f"{type(exc).__name__}: {exc}")

        return in_netns(namespace, attempt)

    # internals

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("PodNetwork is not started: use `with PodNetwork() as net:`")

    def _member(self, name: str) -> _Member:
        try:
            return self._members[name]
        except KeyError:
            raise KeyError(
                f"no pod or outsider named {name!r} in this PodNetwork "
                f"(has: {', '.join(sorted(self._members)) or 'none'})"
            ) from None

    def _add_namespace(self, namespace: str) -> None:
        try:
            _run(["ip", "netns", "add", namespace])
        except RuntimeError as exc:
            raise NamespacesUnavailable(f"cannot make a network namespace: {exc}") from exc
        # Before eth0 exists, so that it takes this default: no IPv6 on eth0 (like a pod of an
        # IPv4 cluster: no link-local address around the IPv4 policy, no DAD delay); lo keeps ::1.
        try:
            in_netns(namespace, lambda: _write_sysctl("net/ipv6/conf/default/disable_ipv6", "1"))
        except OSError as exc:
            raise NamespacesUnavailable(
                f"cannot enter network namespace {namespace}: {exc}"
            ) from exc

    def _add_member(self, name: str, *, outsider: bool) -> PodAddress:
        if not _POD_NAME.match(name):
            raise ValueError(f"pod name {name!r} is not an RFC 1123 label (a-z, 0-9, '-')")
        with self._lock:
            self._require_started()
            if name in self._members:
                raise ValueError(f"{name!r} is already in this PodNetwork")
            try:
                ip = str(next(self._hosts))
            except StopIteration:
                raise RuntimeError(f"subnet {self.subnet} is full") from None
            namespace = f"{self.instance}-{name}"
            member = _Member(name, PodAddress(namespace, ip), outsider)
            self._members[name] = member
            try:
                self._add_namespace(namespace)
                self._veths += 1
                veth = f"p{self._veths}"
                _run(
                    ["ip", "-n", self.switch, "-batch", "-"],
                    stdin=f"link add {veth} type veth peer name eth0 netns {namespace}\n"
                    f"link set {veth} master br0 up\n",
                )
                _run(
                    ["ip", "-n", namespace, "-batch", "-"],
                    stdin=f"link set lo up\naddr add {ip}/{self.subnet.prefixlen} dev eth0\n"
                    "link set eth0 up\n",
                )
                self._write_hosts()
                self._listen(member, self._ports)
            except BaseException:  # undo this pod only; the network stays usable
                del self._members[name]
                self._drop_listeners(namespace)
                _delete_namespaces([namespace], grace=0)
                raise
            return member.address

    def _listen(self, member: _Member, ports: list[int]) -> None:
        assert self._relay is not None
        for port in ports:
            try:
                sock = in_netns(member.address.namespace, lambda p=port: _listen_loopback(p))
            except OSError as exc:
                raise RuntimeError(
                    f"cannot listen on 127.0.0.1:{port} in {member.name}'s namespace: {exc}"
                ) from exc
            try:
                server = self._relay.serve(sock, port)
            except BaseException:
                sock.close()
                raise
            self._listeners.setdefault(member.address.namespace, []).append(server)

    def _drop_listeners(self, namespace: str) -> None:
        servers = self._listeners.pop(namespace, [])
        if servers and self._relay is not None:
            self._relay.stop(servers)

    def _write_hosts(self) -> None:
        """The pods' /etc/hosts: every member's name and IP. Rewritten in place (same inode),
        so the pods already running see the pods added after them."""
        entries = "".join(f"{m.address.ip}\t{m.name}\n" for m in self._members.values())
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.hosts_file, "w") as f:
            f.write(
                "# Written by tests/cluster_sim/netns.py: this pod and its peers.\n"
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + entries
            )


def _nft_ruleset(rules: dict[int, tuple[list[str], str]]) -> str:
    lines = [
        "table inet vfsim {}",
        "delete table inet vfsim",  # with the line above: replace the table, atomically
        "table inet vfsim {",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        '    iif "lo" accept',
    ]
    for port, (ips, action) in sorted(rules.items()):
        if ips:
            lines.append(f"    tcp dport {port} ip saddr {{ {', '.join(ips)} }} accept")
        verdict = "reject with tcp reset" if action == "reject" else "drop"
        lines.append(f"    tcp dport {port} {verdict}")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _iptables_ruleset(rules: dict[int, tuple[list[str], str]]) -> str:
    # IPv4 only: the pods' eth0 has no IPv6 (see _add_namespace), so there is no way around it.
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines.append("-A INPUT -i lo -j ACCEPT")
    for port, (ips, action) in sorted(rules.items()):
        lines += [f"-A INPUT -p tcp --dport {port} -s {ip} -j ACCEPT" for ip in ips]
        verdict = "REJECT --reject-with tcp-reset" if action == "reject" else "DROP"
        lines.append(f"-A INPUT -p tcp --dport {port} -j {verdict}")
    lines += ["COMMIT", ""]
    return "\n".join(lines)


__all__ = [
    "ConnectFailure",
    "NamespacesUnavailable",
    "PodAddress",
    "PodNetwork",
    "check_host",
    "clean_stale",
    "firewall_tool",
    "in_netns",
]
