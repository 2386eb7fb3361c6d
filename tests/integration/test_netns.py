"""Pods as separate hosts (tests/cluster_sim/netns.py): addresses, host services, the
rendezvous port's NetworkPolicy, a gloo rendezvous across namespaces, and cleanup.

Needs root, iproute2, and nft or iptables for the policy: skipped with the reason otherwise.
VISIONFLOW_REQUIRE_NETNS=1 turns those skips into failures (CI, where the tools are installed).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.cluster_sim.netns import (
    HOSTS_DIR,
    NETNS_DIR,
    PREFIX,
    NamespacesUnavailable,
    PodNetwork,
    firewall_tool,
)

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# Real namespaces on this host: one xdist worker makes them all (test_cluster_sim.py too).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("netns")]


def _unavailable(exc: NamespacesUnavailable) -> None:
    if os.environ.get("VISIONFLOW_REQUIRE_NETNS") == "1":
        pytest.fail(f"VISIONFLOW_REQUIRE_NETNS=1 but: {exc}")
    pytest.skip(str(exc))


@pytest.fixture
def net():
    network = PodNetwork()
    try:
        network.start()
    except NamespacesUnavailable as exc:
        _unavailable(exc)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def firewall():
    try:
        return firewall_tool()
    except NamespacesUnavailable as exc:
        _unavailable(exc)


def _ours() -> set[str]:
    names = set()
    for directory in (NETNS_DIR, HOSTS_DIR):
        if directory.is_dir():
            names.update(p.name for p in directory.iterdir() if p.name.startswith(PREFIX))
    return names


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _in_pod(net: PodNetwork, pod: str, code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        net.wrap(pod, [PY, "-c", code]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs,
    )  # fmt: skip


def _server(net: PodNetwork, pod: str, host: str, ports: list[int]) -> subprocess.Popen:
    """A TCP server in the pod, listening on host:port for each port; prints each peer's IP."""
    code = (
        "import selectors, socket\n"
        f"socks = [socket.create_server(({host!r}, p)) for p in {ports!r}]\n"
        "sel = selectors.DefaultSelector()\n"
        "[sel.register(s, selectors.EVENT_READ) for s in socks]\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    for key, _ in sel.select():\n"
        "        conn, peer = key.fileobj.accept()\n"
        "        print(peer[0], flush=True)\n"
        "        conn.close()\n"
    )
    proc = _in_pod(net, pod, code)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def test_pods_are_separate_hosts(net):
    a, b = net.add_pod("a"), net.add_pod("b")
    assert a.ip != b.ip and a.namespace != b.namespace

    server = _server(net, "a", a.ip, [7000])  # on pod A's own address, not 0.0.0.0
    try:
        # wrap() execs all the way down: the Popen's pid is the pod's program (for signals)
        assert os.readlink(f"/proc/{server.pid}/exe") == os.path.realpath(PY)
        assert net.can_connect("b", a.ip, 7000) is True
        assert server.stdout.readline().strip() == b.ip  # A sees B's address: another host
        # B's loopback is B's own: A's server is not there.
        assert net.can_connect("b", "127.0.0.1", 7000) == "refused"
    finally:
        _stop(server)

    # Like on Kubernetes: hostname = pod name, resolving to the pod's IP; peers resolve too.
    # (An empty environment: wrap() must not depend on PATH.)
    probe = _in_pod(
        net, "b", "import socket; h = socket.gethostname(); "
        "print(h, socket.gethostbyname(h), socket.gethostbyname('a'))",
        env={},
    )  # fmt: skip
    out, err = probe.communicate(timeout=30)
    assert probe.returncode == 0, err
    assert out.split() == ["b", b.ip, a.ip]


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        self._reply(b"hello from the host")

    def do_POST(self):
        self._reply(self.rfile.read(int(self.headers["Content-Length"])))

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_host_loopback_services_reach_pods(net):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        net.add_pod("before")  # pods made before and after the ports are exposed
        net.expose_host_ports([port])
        net.add_pod("after")
        code = (
            "import hashlib, urllib.request\n"
            f"url = 'http://127.0.0.1:{port}/'\n"
            "print(urllib.request.urlopen(url, timeout=10).read().decode())\n"
            "body = bytes(range(256)) * 8192\n"  # 2 MiB each way, like an S3 upload
            "echo = urllib.request.urlopen(url, data=body, timeout=10).read()\n"
            "print(hashlib.sha256(echo).hexdigest())\n"
        )
        digest = hashlib.sha256(bytes(range(256)) * 8192).hexdigest()
        probes = [_in_pod(net, pod, code) for pod in ("before", "after")]
        for probe in probes:
            out, err = probe.communicate(timeout=30)
            assert probe.returncode == 0, err
            assert out.split("\n")[:2] == ["hello from the host", digest]

        # Only the exposed ports: another service on the host's loopback stays out of reach.
        with socket.create_server(("127.0.0.1", 0)) as other:
            assert net.can_connect("after", "127.0.0.1", other.getsockname()[1]) == "refused"
    finally:
        server.shutdown()
        server.server_close()


def test_isolate_port_lets_only_the_job_in(net, firewall):
    master = net.add_pod("master")
    net.add_pod("worker")
    net.add_outsider("intruder")
    rendezvous, other = 29500, 29501
    server = _server(net, "master", "0.0.0.0", [rendezvous, other])
    try:
        assert net.can_connect("intruder", master.ip, rendezvous) is True  # reachable before

        net.isolate_port("master", rendezvous, ["worker"])
        assert net.can_connect("worker", master.ip, rendezvous) is True
        assert net.can_connect("master", master.ip, rendezvous) is True  # the pod itself
        # "refused": a TCP RST; a dropped SYN reads "timeout" (below).
        assert net.can_connect("intruder", master.ip, rendezvous) == "refused"
        assert net.can_connect("intruder", master.ip, other) is True  # only that port

        # What most real CNIs do: drop, and the intruder waits out its timeout.
        net.isolate_port("master", rendezvous, ["worker"], action="drop")
        assert net.can_connect("intruder", master.ip, rendezvous, timeout=0.5) == "timeout"
        assert net.can_connect("worker", master.ip, rendezvous) is True
    finally:
        _stop(server)


GLOO = """
import datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print("sum", t.item(), flush=True)
dist.destroy_process_group()
"""


def test_gloo_rendezvous_across_pods(net):
    master = net.add_pod("job-master-0")
    net.add_pod("job-worker-0")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLOO_", "MASTER_"))}
    env |= {"MASTER_ADDR": master.ip, "MASTER_PORT": "29500", "WORLD_SIZE": "2"}
    procs = [
        _in_pod(net, pod, GLOO, env={**env, "RANK": str(rank)})
        for rank, pod in enumerate(("job-master-0", "job-worker-0"))
    ]
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-3000:]
            assert out.strip() == "sum 3.0"
            assert "loopback" not in err  # gloo found the pod's address, not 127.0.0.1
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc)


def test_everything_is_removed(net):
    links = _host_links()
    with socket.create_server(("127.0.0.1", 0)) as host_service, PodNetwork() as other:
        other.add_pod("a")
        other.add_outsider("b")
        other.expose_host_ports([host_service.getsockname()[1]])  # a listener in each namespace
        left = subprocess.Popen(other.wrap("a", ["sleep", "60"]))  # never stopped by us
        mine = {n for n in _ours() if n.startswith(other.instance)}
        assert len(mine) == 4, mine  # the switch, a, b and the hosts file's directory
        assert _host_links() == links  # nothing in the host's namespace

        # A pod that fails halfway is undone, and the network stays usable.
        listen = other._listen

        def listen_then_fail(member, ports):
            listen(member, ports)
            raise OSError("injected")

        other._listen = listen_then_fail
        with pytest.raises(OSError, match="injected"):
            other.add_pod("c")
        assert not (NETNS_DIR / f"{other.instance}-c").exists()
        del other._listen
        c = other.add_pod("c")  # the name is free again, and so is its 127.0.0.1:<port>
        assert other.can_connect("c", "127.0.0.1", host_service.getsockname()[1]) is True
        assert other.can_connect("b", c.ip, 1) == "refused"
    assert left.wait(timeout=10) == -signal.SIGTERM
    assert not {n for n in _ours() if n.startswith(other.instance)}
    assert _host_links() == links
    assert not [t for t in threading.enumerate() if t.name == "vfsim-relay" and t.is_alive()][1:]

    # An error (or Ctrl-C) inside the `with` cleans up as well.
    with pytest.raises(KeyboardInterrupt), PodNetwork() as third:
        third.add_pod("a")
        raise KeyboardInterrupt
    assert not {n for n in _ours() if n.startswith(third.instance)}


def test_a_killed_run_is_cleaned_by_the_next(net):
    code = (
        "import subprocess, time\n"
        "from tests.cluster_sim.netns import PodNetwork\n"
        "net = PodNetwork().start()\n"
        "net.add_pod('a')\n"
        "orphan = subprocess.Popen(net.wrap('a', ['sleep', '60']), stdout=subprocess.DEVNULL)\n"
        "print(net.instance, orphan.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [PY, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        instance, orphan = owner.stdout.readline().split()
    finally:
        owner.kill()  # SIGKILL: no cleanup
        owner.wait(timeout=10)
        owner.stdout.close()
    stale = {n for n in _ours() if n.startswith(instance)}
    assert len(stale) >= 2, stale  # its switch and pod a are left behind

    with PodNetwork():  # the next run
        assert not {n for n in _ours() if n.startswith(instance)}
        # the orphan in the stale namespace is gone (or a zombie, waiting for init)
        stat = Path(f"/proc/{orphan}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert net.instance not in instance  # the live instance (the fixture's) was left alone
    assert (NETNS_DIR / net.switch).exists()
