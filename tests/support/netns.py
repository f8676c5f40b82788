"""Several "machines" on this one: Linux network namespaces joined by a bridge, for the
multi-node tests (tests/test_multinode.py).

    with network_namespaces(2) as net:          # skips (NetnsUnavailable) where it cannot work
        net.nodes[0].addr                       # 198.18.K.2, the first "machine"
        net.nodes[0].ifname                     # its interface (GLOO_SOCKET_IFNAME)
        subprocess.run(net.nodes[1].exec(["python", "-c", "..."]))   # runs inside node 1
        net.host_addr                           # 198.18.K.1: this host, on the bridge

Layout: one bridge `rscbrT` (T: a tag unique to this process, from its pid), one namespace
`rscT-nI` per node, each joined to the bridge by a veth pair (`rscThI` on the bridge,
`rscTnI` inside the namespace, its name kept so that every node has its own interface name),
addresses from 198.18.0.0/15 (RFC 2544, benchmarking; never routed) on the bridge only:
198.18.K.1/24 for this host, .2, .3 ... for the nodes, loopback up everywhere. K is chosen so
that no interface of this host already has an address in 198.18.K.0/24.

The namespaces share everything but the network: the file system (so unix sockets such as
munge's, the checkout, the run folders), the users, the hostname. Hostnames therefore do not
tell the nodes apart and do not resolve to the nodes' addresses, as on clusters where the
scheduler's node names are not DNS names.

Cleanup (the `finally` of the context manager, also when the test fails or is interrupted):
every process still inside a namespace is sent SIGTERM, then SIGKILL (they were started by
the test), then the namespaces, the host ends of the veths and the bridge are deleted. Every
command and every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NETWORK = ipaddress.ip_network("198.18.0.0/15")
CMD_TIMEOUT = 20  # seconds for any one `ip` command
NETNS_DIR = "/var/run/netns"  # where `ip netns add` puts the namespaces' handles
# One file per live Network: "PID N". A session killed before its `finally` (SIGKILL, a CI
# timeout) leaves namespaces and a bridge behind; the next session removes those whose PID is
# gone (tmpfs: nothing survives a reboot anyway).
STATE_DIR = Path("/run/rsc_netns")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, creation refused)."""


@dataclass(frozen=True)
class Node:
    index: int
    netns: str  # namespace name (`ip netns exec NETNS ...`)
    ifname: str  # the interface inside the namespace, on the bridge
    addr: str  # its IPv4 address

    def exec(self, cmd: list[str]) -> list[str]:
        """`cmd` prefixed to run inside this node's namespace (`ip netns exec`, which also
        mounts a sysfs of the namespace over /sys: the host's /sys/fs/cgroup is gone there)."""
        return ["ip", "netns", "exec", self.netns, *cmd]

    def enter(self, cmd: list[str]) -> list[str]:
        """`cmd` prefixed to run in this node's network namespace and nothing else (nsenter):
        the mounts stay the host's, cgroups included (slurmd needs them)."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns}", *cmd]


@dataclass
class Network:
    tag: str
    bridge: str
    subnet: ipaddress.IPv4Network
    host_addr: str
    nodes: list[Node] = field(default_factory=list)

    def check_tcp(self, src: Node | None, dst: Node, timeout: float = 15) -> None:
        """A TCP connection from `src` (None: this host) to a listener in `dst`, or raise."""
        tcp_roundtrip(src, dst, timeout)


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` took more than {CMD_TIMEOUT} s") from None
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            iface = ipaddress.ip_interface(parts[parts.index("inet") + 1])
            used.add(iface.network)
    return used


def _links() -> set[str]:
    out = _ip("-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _pick(n: int) -> tuple[str, ipaddress.IPv4Network]:
    """A tag whose bridge name is free and a /24 of 198.18.0.0/15 no interface here uses."""
    links = _links()
    namespaces = set(_ip("netns", "list").stdout.split())
    used = _used_subnets()
    subnets = list(NETWORK.subnets(new_prefix=24))
    base = os.getpid()
    for attempt in range(1000):
        tag = str((base + attempt) % 1000)
        if f"rscbr{tag}" in links or any(ns.startswith(f"rsc{tag}-") for ns in namespaces):
            continue
        for k in range(len(subnets)):
            subnet = subnets[(base + attempt + k) % len(subnets)]
            if subnet.num_addresses - 3 >= n and not any(subnet.overlaps(u) for u in used):
                return tag, subnet
    raise NetnsUnavailable("no free bridge name / 198.18.x.0/24 subnet found")


def _kill_namespace_processes(netns: str, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, every process left inside `netns` (all started by the test)."""
    def pids() -> list[int]:
        p = _ip("netns", "pids", netns, check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()] if p.returncode == 0 else []

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        left = pids()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)


def _cleanup(net: Network, namespaces: list[str]) -> list[str]:
    """Remove what was made; returns the errors (cleanup goes on past them)."""
    errors = []
    for ns in namespaces:
        try:
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns)
        except Exception as exc:  # noqa: BLE001 - keep cleaning up
            errors.append(str(exc))
    links = _links()
    for i in range(len(namespaces) + 1):
        host_end = f"rsc{net.tag}h{i}"
        if host_end in links:  # normally gone with its peer's namespace
            with contextlib.suppress(Exception):
                _ip("link", "del", host_end)
    if net.bridge in _links():
        try:
            _ip("link", "del", net.bridge)
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
    return errors


def _reap_stale() -> None:
    """Remove what sessions that died without cleaning up left behind (see STATE_DIR)."""
    if not STATE_DIR.is_dir():
        return
    for record in STATE_DIR.iterdir():
        try:
            pid, n = (int(x) for x in record.read_text().split())
            os.kill(pid, 0)
            continue  # its owner is alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue
        tag = record.name
        namespaces = set(_ip("netns", "list").stdout.split())
        stale = Network(tag=tag, bridge=f"rscbr{tag}", subnet=NETWORK, host_addr="")
        _cleanup(stale, [ns for ns in (f"rsc{tag}-n{i}" for i in range(n)) if ns in namespaces])
        record.unlink(missing_ok=True)


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces cannot work here."""
    if sys.platform != "linux":
        raise NetnsUnavailable("network namespaces are Linux only")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    if not shutil.which("ip"):
        raise NetnsUnavailable("`ip` (iproute2) is not installed")
    if not shutil.which("nsenter"):
        raise NetnsUnavailable("`nsenter` (util-linux) is not installed")


@contextlib.contextmanager
def network_namespaces(n: int, ready_timeout: float = 30):
    """`n` namespaces on a fresh bridge; yields a Network; removes everything on exit."""
    check_available()
    _reap_stale()
    tag, subnet = _pick(n)
    hosts = list(subnet.hosts())
    net = Network(tag=tag, bridge=f"rscbr{tag}", subnet=subnet, host_addr=str(hosts[0]))
    made: list[str] = []
    record = STATE_DIR / tag
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{os.getpid()} {n}\n")
        try:
            _ip("link", "add", net.bridge, "type", "bridge")
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a bridge: {exc}") from None
        # Bridged frames must not go through the host's iptables (a FORWARD policy of DROP,
        # as Docker sets, would drop them). Older kernels lack the option: then best effort.
        _ip("link", "set", net.bridge, "type", "bridge", "nf_call_iptables", "0", check=False)
        _ip("addr", "add", f"{net.host_addr}/{subnet.prefixlen}", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(n):
            ns, host_end, inner = f"rsc{tag}-n{i}", f"rsc{tag}h{i}", f"rsc{tag}n{i}"
            try:
                _ip("netns", "add", ns)
            except RuntimeError as exc:
                raise NetnsUnavailable(f"cannot create a network namespace: {exc}") from None
            made.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host_end, "master", net.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", "lo", "up", netns=ns)
            addr = str(hosts[i + 1])
            _ip("addr", "add", f"{addr}/{subnet.prefixlen}", "dev", inner, netns=ns)
            _ip("link", "set", inner, "up", netns=ns)
            net.nodes.append(Node(i, ns, inner, addr))
        _wait_reachable(net, ready_timeout)
        yield net
    finally:
        errors = _cleanup(net, made)
        if not errors:
            record.unlink(missing_ok=True)
        if errors:
            print("netns cleanup problems:\n" + "\n".join(errors), file=sys.stderr)


def _wait_reachable(net: Network, timeout: float) -> None:
    """TCP from the host to every node and from node 0 to every other node and back (the
    bridge forwards only once its ports leave the learning state: retry until `timeout`)."""
    pairs = [(None, node) for node in net.nodes]
    first = net.nodes[0]
    pairs += [(first, node) for node in net.nodes[1:]] + [(node, first) for node in net.nodes[1:]]
    deadline = time.monotonic() + timeout
    for src, dst in pairs:
        while True:
            try:
                tcp_roundtrip(src, dst, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
                break
            except RuntimeError as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"network namespaces not reachable after {timeout:.0f} s: {exc}") from None
                time.sleep(0.3)


_SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(float(sys.argv[2]))
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.sendall(b"pong " + c.recv(64)); c.close()
"""
_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
c.sendall(b"ping"); print(c.recv(64).decode())
"""


def tcp_roundtrip(src: Node | None, dst: Node, timeout: float = 15) -> None:
    """A listener inside `dst` on its address, a client in `src` (None: the host); raise
    RuntimeError unless the client gets the listener's answer within `timeout`."""
    py = sys.executable
    server = subprocess.Popen(dst.exec([py, "-c", _SERVER, dst.addr, str(timeout)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import select

        ready, _, _ = select.select([server.stdout], [], [], timeout)
        port = server.stdout.readline().strip() if ready else ""
        if not port.isdigit():
            server.kill()
            raise RuntimeError(f"listener in {dst.netns} did not start: {server.communicate(timeout=5)[1][-500:]}")
        client_cmd = [py, "-c", _CLIENT, dst.addr, port, str(timeout)]
        if src is not None:
            client_cmd = src.exec(client_cmd)
        try:
            c = subprocess.run(client_cmd, capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"client {src.netns if src else 'host'} -> {dst.addr}:{port} hung") from None
        if c.returncode != 0 or c.stdout.strip() != "pong ping":
            raise RuntimeError(f"{src.netns if src else 'host'} -> {dst.netns} {dst.addr}:{port}: "
                               f"{c.stdout.strip()} {c.stderr.strip()[-300:]}")
    finally:
        if server.poll() is None:
            server.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.communicate(timeout=5)
