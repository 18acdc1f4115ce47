"""Network namespaces for cluster tests: N nodes on one private LAN that exists only here.

    with Cluster(n=3) as net:
        proc = net.run(net.nodes[0], [sys.executable, "-m", "exod"], env)
        net.cut(net.nodes[1]); ...; net.restore(net.nodes[1])

Each node is a network namespace with one link, `ex0`, holding the node's address. The links
meet on a bridge in a namespace of its own (a bridge in a node's namespace would give that node
two ways onto the LAN), with multicast snooping off so that mDNS (224.0.0.251) reaches every
node. Every link is created inside our namespaces, never on the machine's own: the host's
interfaces are not touched even for a moment, and deleting the namespaces deletes the links.
IPv6 is off in them, so each namespace has the addresses we gave it and nothing else.

With `decoy=True` each node also has a second interface, `dx0`, with an address on a subnet of
its own and nothing behind it (the far end of its veth pair stays in the namespace): it stands
for the machine's other interfaces, to show that mDNS pinned to `ex0` stays off them.

Where namespaces cannot be made (not root, no iproute2, not Linux) the test is skipped, or fails
where CI demands namespaces (`.ci/run` sets EXOD_REQUIRE_NETNS=1). Closing kills what `run`
started (its process group), deletes the namespaces, and fails if any of ours remains, a process
outlived its namespace, or the host's interfaces changed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, NoReturn

import psutil
import pytest

from tests.daemon import Daemon

IFNAME = "ex0"  # a node's link to the bridge, inside the node's namespace
DECOY = "dx0"  # the decoy's end with an address; its peer is DECOY_PEER, in the same namespace
DECOY_PEER = "dx1"
BRIDGE = "br0"
ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole", "unreachable"}
ROUTE_TYPES |= {"prohibit", "throw", "nat"}


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def host_links() -> set[str]:
    """The host's interface names (read only, to show that a cluster left them alone)."""
    return {line.split(":")[1].strip() for line in ip("-o", "link", "show").stdout.splitlines()}


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination in the host's routing tables (read only)."""
    return route_destinations(ip("-4", "route", "show", "table", "all").stdout)


def route_destinations(routes: str) -> list[ipaddress.IPv4Network]:
    """The destinations in `ip -4 route show` output, less the default route."""
    found = []
    for line in routes.splitlines():
        words = line.split()
        if not words:
            continue
        dest = words[1] if words[0] in ROUTE_TYPES and len(words) > 1 else words[0]
        if dest != "default":
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Network(dest, strict=False))
    return found


def free_subnets(count: int, taken: Sequence[ipaddress.IPv4Network]) -> list[str]:
    """`count` random /24s of 10.231.0.0/16 (their first three octets) that no host route
    overlaps, so that no address of ours can be mistaken for one of the host's."""
    thirds = list(range(1, 255))
    random.shuffle(thirds)
    free = []
    for third in thirds:
        net = ipaddress.IPv4Network(f"10.231.{third}.0/24")
        if not any(net.overlaps(t) for t in taken):
            free.append(f"10.231.{third}")
        if len(free) == count:
            return free
    raise AssertionError("no free /24 in 10.231.0.0/16: the host routes all of it")


def cannot(why: str) -> NoReturn:
    """No namespaces here: a skip, or a failure where CI demands namespaces, so that a test
    cannot pass there by quietly not running."""
    if os.environ.get("EXOD_REQUIRE_NETNS") == "1":
        pytest.fail(f"EXOD_REQUIRE_NETNS=1, but {why}")
    pytest.skip(why)


@dataclass(frozen=True)
class Node:
    index: int
    ns: str
    addr: str  # on `ifname`, in the LAN's /24
    ifname: str
    bridge_port: str  # the other end of `ifname`, in the bridge's namespace: what cut() downs
    decoy_addr: str | None = None  # on DECOY, with decoy=True

    def __str__(self) -> str:
        return f"node {self.index} ({self.ns}, {self.addr})"


class Cluster:
    """N node namespaces on a bridge of their own; a context manager that deletes them all."""

    def __init__(self, n: int = 3, *, decoy: bool = False) -> None:
        assert 1 <= n <= 200
        self.n = n
        self.decoy = decoy
        self.tag = secrets.token_hex(3)
        self.bridge_ns = f"exc{self.tag}br"
        self.nodes: list[Node] = []
        self.subnet = ""
        self._made: list[str] = []  # namespaces, in the order made
        self._procs: list[subprocess.Popen[bytes]] = []
        self._host_links: set[str] = set()

    # --- setup ---------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        if not sys.platform.startswith("linux"):
            cannot("network namespaces are Linux's")
        if shutil.which("ip") is None:
            cannot("iproute2's `ip` is not installed: cannot create network namespaces")
        self._host_links = host_links()
        made = ip("netns", "add", self.bridge_ns, check=False)
        if made.returncode != 0:
            cannot(f"`ip netns add` failed (it needs root): {made.stderr.strip()}")
        self._made.append(self.bridge_ns)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        lan, spare = free_subnets(2, host_networks())
        self.subnet = f"{lan}.0/24"
        self._quiet(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        ip("-n", self.bridge_ns, "link", "set", BRIDGE, "up")
        for i in range(self.n):
            ns = f"exc{self.tag}n{i}"
            ip("netns", "add", ns)
            self._made.append(ns)
            self._quiet(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            decoy = f"{spare}.{i + 1}" if self.decoy else None
            node = Node(i, ns, f"{lan}.{i + 1}", IFNAME, f"p{i}", decoy)
            self._link(node)
            if decoy is not None:
                self._add_decoy(node)
            self.nodes.append(node)

    def _link(self, node: Node) -> None:
        # The pair is made in the bridge's namespace with its peer made in the node's: at no
        # moment does a link of ours exist on the host.
        bridge = self.bridge_ns
        peer = ("peer", "name", node.ifname, "netns", node.ns)
        ip("-n", bridge, "link", "add", node.bridge_port, "type", "veth", *peer)
        ip("-n", bridge, "link", "set", node.bridge_port, "master", BRIDGE, "up")
        ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
        ip("-n", node.ns, "link", "set", node.ifname, "up")

    def _add_decoy(self, node: Node) -> None:
        ip("-n", node.ns, "link", "add", DECOY, "type", "veth", "peer", "name", DECOY_PEER)
        ip("-n", node.ns, "addr", "add", f"{node.decoy_addr}/24", "dev", DECOY)
        ip("-n", node.ns, "link", "set", DECOY_PEER, "up")
        ip("-n", node.ns, "link", "set", DECOY, "up")

    @staticmethod
    def _quiet(ns: str) -> None:
        """IPv6 off in `ns` before any link is made there: no link-local addresses, router
        solicitations or MLD reports, only the IPv4 we configure."""
        script = "for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done"
        subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-c", script],
            capture_output=True,
            timeout=30,
            check=False,  # a kernel without IPv6 has nothing to turn off
        )

    # --- use -----------------------------------------------------------------------------------

    def run(
        self,
        node: Node,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdout: int | IO[bytes] = subprocess.PIPE,
        stderr: int | IO[bytes] = subprocess.PIPE,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `node`'s namespace (`ip netns exec` execs it: same pid), with
        os.environ updated by `env`, in a process group of its own that close() ends."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, *argv],
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def exec(self, node: Node, argv: Sequence[str]) -> str:
        """Run `argv` to its end inside `node`'s namespace; its stdout."""
        done = subprocess.run(
            ["ip", "netns", "exec", node.ns, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, f"{' '.join(argv)} in {node}: {done.stderr.strip()}"
        return done.stdout

    def in_node(self, pid: int, node: Node) -> bool:
        """Whether process `pid` runs in `node`'s namespace (`ip netns exec` enters it before
        it execs the command: not yet, just after run())."""
        try:
            inode = os.stat(f"/run/netns/{node.ns}").st_ino
            return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{inode}]"
        except OSError:
            return False

    def cut(self, node: Node) -> None:
        """Unplug `node` from the LAN: its port on the bridge goes down (the node's own link
        loses its carrier, as when a cable is pulled or Wi-Fi drops)."""
        ip("-n", self.bridge_ns, "link", "set", node.bridge_port, "down")

    def restore(self, node: Node) -> None:
        ip("-n", self.bridge_ns, "link", "set", node.bridge_port, "up")

    def udp_sockets(self, node: Node) -> list[tuple[str, int, int]]:
        """(local address, port, pid) of each UDP socket open in `node`'s namespace."""
        found = []
        for line in self.exec(node, ["ss", "-H", "-u", "-a", "-n", "-p"]).splitlines():
            words = line.split()
            local = words[3]
            address, _, port = local.rpartition(":")
            for owner in line.split("pid=")[1:]:
                found.append((address.strip("[]"), int(port), int(owner.split(",")[0])))
        return found

    def multicast_groups(self, node: Node) -> dict[str, set[str]]:
        """The IPv4 multicast groups joined on each interface of `node`'s namespace."""
        groups: dict[str, set[str]] = {}
        for entry in json.loads(ip("-n", node.ns, "-j", "-4", "maddr", "show").stdout):
            groups[entry["ifname"]] = {m["address"] for m in entry.get("maddr", [])}
        return groups

    def tx_packets(self, node: Node, ifname: str) -> int:
        [link] = json.loads(ip("-n", node.ns, "-j", "-s", "link", "show", "dev", ifname).stdout)
        return int(link["stats64"]["tx"]["packets"])

    # --- teardown ------------------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """End our processes, delete our namespaces (and with them every link we made), then
        fail if anything of ours is left or the host's interfaces changed."""
        for proc in self._procs:
            _end(proc)
        outlived = []
        for ns in self._made:
            # Whatever is still inside is ours (the namespace is): a child that left our
            # process group. Ended by pid, and reported.
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                outlived.append(f"{pid} in {ns}")
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(int(pid)).kill()
        failed = [
            f"{ns}: {done.stderr.strip()}"
            for ns in reversed(self._made)
            if (done := ip("netns", "delete", ns, check=False)).returncode != 0
        ]
        left = set(self._made) & netns_names()
        self._made = []
        self._procs = []
        assert not failed, f"could not delete network namespaces: {failed}"
        assert not left, f"network namespaces still there: {sorted(left)}"
        assert not outlived, f"processes outlived their namespace: {outlived}"
        assert host_links() == self._host_links, "the host's interfaces changed"


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End `proc`'s process group: SIGTERM, then SIGKILL after 3 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def launch_exod(net: Cluster, node: Node, daemon: Daemon) -> None:
    """Start `daemon`'s exod inside `node`'s namespace (not waiting for it): its log goes to
    a file beside its home, and exoctl reaches it from the host through its Unix socket."""
    daemon.home.mkdir(parents=True, exist_ok=True)
    path = daemon.home.parent / f"{daemon.home.name}-exod.log"
    log = open(path, "ab")  # noqa: SIM115  # the daemon's own: closed here once it holds it
    daemon.log_path = path
    daemon.proc = net.run(
        node, [sys.executable, "-m", "exod"], daemon.base_env(), stdout=log, stderr=log
    )
    log.close()
