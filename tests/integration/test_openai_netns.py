"""The API key with exod really bound beyond loopback: without the key, or with a wrong one, a
request gets 401 and no generation runs; without a key file exod refuses to start (exit 78).

test_openai_access.py tests the key on 127.0.0.1 so as not to open a port to the network. Here
exod listens on a non-loopback address, safely: inside a network namespace that this module
creates (needs root and iproute2; skipped otherwise) and deletes afterwards. The address lives
on an interface made inside that namespace (a dummy, or a veth pair whose both ends stay
there), so nothing outside the namespace can reach it, and the host's interfaces are never
touched. exod and the HTTP clients run inside the namespace (`ip netns exec`); exoctl talks to
exod from the host through its Unix socket, which is on the shared filesystem.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest

from tests import models
from tests.daemon import Daemon, short_dir, wait_until

PORT = 52415  # the namespace is new and ours: even the default port is free in it
PROMPT = "Once upon a time"
MAX_TOKENS = 8
KEY = secrets.token_hex(16)  # 32 characters
RUN_EVENTS = frozenset({"RunAccepted", "RunnerSpawned"})

# Plain HTTP from inside the namespace; one process sends a batch of requests and prints the
# answers as JSON (status None and the error when the connection itself fails).
CLIENT = r"""
import http.client, json, sys
host, port, batch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
answers = []
for method, path, body, headers in batch:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers = {**headers, "Content-Type": "application/json"}
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        answers.append({
            "status": response.status,
            "headers": {k.lower(): v for k, v in response.getheaders()},
            "body": response.read().decode(errors="replace"),
        })
    except OSError as e:
        answers.append({"status": None, "error": repr(e)})
    finally:
        conn.close()
print(json.dumps(answers))
"""

Request = tuple[str, str, Any, dict[str, str]]  # method, path, JSON body or None, headers


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


def netns_names() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


def host_links() -> set[str]:
    """The host's interface names (read only, to show that the module left them alone)."""
    return {line.split(":")[1].strip() for line in ip("-o", "link", "show").stdout.splitlines()}


@dataclass(frozen=True)
class Netns:
    name: str
    address: str  # on `device`, not on lo

    def http(self, host: str, port: int, batch: list[Request]) -> list[dict[str, Any]]:
        """Send `batch` from inside the namespace; the answers, in order."""
        argv = [sys.executable, "-I", "-c", CLIENT, host, str(port), json.dumps(batch)]
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        answers: list[dict[str, Any]] = json.loads(done.stdout)
        return answers


def _configure(name: str) -> Netns:
    """lo up, and a /32 address on an interface of its own, all inside namespace `name`."""
    address = f"10.231.{secrets.randbelow(254) + 1}.1"
    device = "exo0"
    dummy = ip("-n", name, "link", "add", device, "type", "dummy")
    if dummy.returncode != 0:  # no dummy module (some containers): a veth pair, both ends here
        veth = ip("-n", name, "link", "add", device, "type", "veth", "peer", "name", "exo1")
        assert veth.returncode == 0, f"no dummy ({dummy.stderr}) nor veth ({veth.stderr})"
        peer = ip("-n", name, "link", "set", "exo1", "up")
        assert peer.returncode == 0, peer.stderr
    for step in (
        ("link", "set", "lo", "up"),
        ("addr", "add", f"{address}/32", "dev", device),
        ("link", "set", device, "up"),
    ):
        done = ip("-n", name, *step)
        assert done.returncode == 0, f"ip -n {name} {' '.join(step)}: {done.stderr}"
    shown = ip("-n", name, "-o", "addr", "show", "dev", device).stdout
    assert f"inet {address}/32" in shown, shown
    assert not ipaddress.ip_address(address).is_loopback
    return Netns(name, address)


def cannot(why: str) -> NoReturn:
    """No namespace here: a skip, or a failure where CI demands namespaces (.ci/run sets
    EXOD_REQUIRE_NETNS=1), so that the test cannot pass there by quietly not running."""
    if os.environ.get("EXOD_REQUIRE_NETNS") == "1":
        pytest.fail(f"EXOD_REQUIRE_NETNS=1, but {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    """A network namespace of this module's own, deleted at the end even if a test failed."""
    if shutil.which("ip") is None:
        cannot("iproute2's `ip` is not installed: cannot create a network namespace")
    links = host_links()
    name = f"exo-{os.getpid()}-{secrets.token_hex(3)}"
    made = ip("netns", "add", name)
    if made.returncode != 0:
        cannot(f"`ip netns add` failed (it needs root): {made.stderr.strip()}")
    try:
        yield _configure(name)
    finally:
        # Only our processes can be in it (exod and its runners end before this runs).
        left = ip("netns", "pids", name).stdout.split()
        for pid in left:
            psutil.Process(int(pid)).kill()
        gone = ip("netns", "delete", name)
        assert gone.returncode == 0, gone.stderr
        assert name not in netns_names(), f"network namespace {name} is still there"
        assert not left, f"processes outlived the test in {name}: {left}"
        assert host_links() == links, "the host's interfaces changed"


@dataclass
class NetnsDaemon(Daemon):
    """exod started inside a network namespace (`ip netns exec` execs it: same pid)."""

    netns: str = ""

    def start(self, *args: str, wait: bool = True) -> NetnsDaemon:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home.parent / f"{self.home.name}-exod.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "exod", *args],
                env=self.base_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready()
            assert psutil.Process(self.pid).cmdline()[1:3] == ["-m", "exod"]
        return self


def netns_daemon(ns: Netns, home: Path, port: int, **env: str) -> NetnsDaemon:
    env = {"EXOD_HTTP_BIND": ns.address, "EXOD_HTTP_PORT": str(port), **env}
    return NetnsDaemon(home=home, socket=short_dir() / "exod.sock", env=env, netns=ns.name)


def kinds(d: Daemon, since: int) -> list[str]:
    return [str(e["kind"]) for e in d.events(since)]


def test_beyond_loopback_without_the_key_or_with_a_wrong_one_nothing_runs(
    netns: Netns, daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    d = netns_daemon(netns, tmp_path / "home", PORT, EXOD_API_KEY_FILE=str(key_file))
    daemon_factory.append(d)
    d.start()
    assert f"OpenAI-compatible API on http://{netns.address}:{PORT}/v1 (API key required)" in (
        d.log()
    )
    # Bound to that address only: loopback in the same namespace has nothing on the port.
    [on_loopback] = netns.http("127.0.0.1", PORT, [("GET", "/v1/models", None, {})])
    assert on_loopback["status"] is None and "ConnectionRefused" in on_loopback["error"]

    d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
    seq = d.last_seq()
    completion = {"model": "qwen", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    chat = {
        "model": "qwen",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
    }
    wrong = [
        {},
        {"Authorization": "Bearer " + KEY[:-1]},
        {"Authorization": "Bearer " + KEY[:-1] + ("0" if KEY[-1] != "0" else "1")},
        {"Authorization": "Bearer " + KEY + "x"},
        {"Authorization": "Bearer " + secrets.token_hex(16)},
        {"Authorization": KEY},
        {"Authorization": "Basic " + KEY},
    ]
    batch: list[Request] = [
        (method, path, body, headers)
        for headers in wrong
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", completion),
            ("POST", "/v1/chat/completions", chat),
        )
    ]
    for sent, answer in zip(batch, netns.http(netns.address, PORT, batch), strict=True):
        assert answer["status"] == 401, (sent, answer)
        error = json.loads(answer["body"])["error"]
        assert error["code"] == "invalid_api_key", (sent, error)
        assert error["type"] == "invalid_request_error", (sent, error)
        assert error["message"], (sent, error)
        assert answer["headers"]["www-authenticate"].startswith("Bearer"), (sent, answer)
    # No generation ran: no run was accepted, no runner spawned, no runner process exists.
    assert not RUN_EVENTS & set(kinds(d, seq)), d.events(seq)
    assert d.runner_pids() == []

    # With the key, the same requests work, and the same event check sees the run.
    right = {"Authorization": "Bearer " + KEY}
    models_answer, answer = netns.http(
        netns.address,
        PORT,
        [("GET", "/v1/models", None, right), ("POST", "/v1/completions", completion, right)],
    )
    assert models_answer["status"] == 200, models_answer
    assert [m["id"] for m in json.loads(models_answer["body"])["data"]] == ["qwen"]
    assert answer["status"] == 200, answer
    reply = json.loads(answer["body"])
    assert reply["usage"]["completion_tokens"] > 0, reply
    after = kinds(d, seq)
    assert after.count("RunAccepted") == 1 and after.count("RunnerSpawned") == 1, after
    # The text is what `exoctl run --raw` prints through the Unix socket, less its newline.
    cli = d.ok("run", "qwen", PROMPT, "--raw", "--max-tokens", str(MAX_TOKENS)).text
    assert reply["choices"][0]["text"] == cli.removesuffix("\n")
    assert reply["choices"][0]["text"]

    assert d.stop(signal.SIGTERM) == 0, d.log()
    assert not d.alive()
    assert wait_until(lambda: d.runner_pids() == [], timeout=5.0, poll=0.1)


def test_beyond_loopback_without_a_key_file_exod_exits_78(
    netns: Netns, daemon_factory: list[Daemon], tmp_path: Path
) -> None:
    port = PORT + 1  # the other test's exod may still hold PORT in this namespace
    d = netns_daemon(netns, tmp_path / "home", port)
    daemon_factory.append(d)
    d.start(wait=False)
    assert d.proc is not None
    try:
        code = d.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"exod did not refuse to start:\n{d.log()}") from None
    assert code == 78, d.log()
    assert "EXOD_API_KEY_FILE" in d.log()
    assert not d.socket.exists()
    [probe] = netns.http(netns.address, port, [("GET", "/v1/models", None, {})])
    assert probe["status"] is None and "ConnectionRefused" in probe["error"], probe
