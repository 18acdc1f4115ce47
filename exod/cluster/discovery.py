"""Finding the cluster's nodes on the LAN: a thin adapter over zeroconf (mDNS/DNS-SD).

A node announces `_exod._tcp.local.` with four TXT records, `cluster`, `node`, `proto` and
`port`, and nothing else: what changes (free memory, runners) travels over mTLS, never in
multicast anyone can read. It browses for the others and reports each one it resolves as a
`Candidate`, whatever it is: ourselves, another cluster's node and a node of another protocol
are reported too, so that the caller can refuse them with a message (see candidates.classify)
instead of them vanishing without a word. A goodbye (or an expiry) is reported as gone.

What arrives from the LAN is untrusted: a record that does not parse is logged once per service
and ignored; nothing from the network raises out of this module.

`interfaces` pins mDNS to the given addresses (multicast is joined and sent only on their
interfaces); None means every interface. Runs on the daemon's asyncio loop; the callbacks are
called on it and must not block.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

import ifaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from exod.cluster.candidates import Candidate, Me

log = logging.getLogger("exod.discovery")

SERVICE_TYPE = "_exod._tcp.local."
TXT_KEYS = ("cluster", "node", "proto", "port")
RESOLVE_TIMEOUT_MS = 3000  # one resolution; an unanswered one waits for the next announcement
WARNED_NAMES = 1024

# Ids are made by exod; what is accepted from the LAN is narrow enough to print and log safely.
# A node id is also the DNS-SD instance name, whose label holds at most 63 bytes.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_CLUSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NUMBER = re.compile(r"[0-9]{1,5}")
_VERSION = re.compile(r"[0-9]{1,5}(\.[0-9]{1,5}){0,2}")

Report = Callable[[Candidate], None]


class DiscoveryError(Exception):
    """Discovery cannot start here; the message is one line that says what to change."""


class Malformed(ValueError):
    """A TXT record set that is not an exod announcement; the message says what is wrong."""


def txt_records(me: Me, port: int) -> dict[str, str]:
    """The TXT records that announce `me` with its peer service on `port`."""
    if not _NODE_ID.fullmatch(me.node_id):
        raise ValueError(f"node id {me.node_id!r} cannot be announced by mDNS")
    if not _CLUSTER_ID.fullmatch(me.cluster_id):
        raise ValueError(f"cluster id {me.cluster_id!r} cannot be announced by mDNS")
    if not _VERSION.fullmatch(me.proto):
        raise ValueError(f"protocol version {me.proto!r} cannot be announced by mDNS")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return {"cluster": me.cluster_id, "node": me.node_id, "proto": me.proto, "port": str(port)}


def _text(properties: Mapping[str, bytes | None], key: str) -> str:
    value = properties.get(key)
    if value is None:
        raise Malformed(f"no {key}= record")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed(f"{key}= is not ASCII: {value[:40]!r}") from None


def _matching(properties: Mapping[str, bytes | None], key: str, pattern: re.Pattern[str]) -> str:
    text = _text(properties, key)
    if not pattern.fullmatch(text):
        raise Malformed(f"{key}={text[:40]!r} is not valid")
    return text


def parse(
    name: str,
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    *,
    own: bool = False,
) -> Candidate:
    """The candidate that service `name` announces, or Malformed saying what is wrong. Keys are
    case-insensitive (RFC 6763 6.4; the first of a repeated key counts) and unknown keys are
    ignored, so that a later version may add records without breaking this one."""
    by_key: dict[str, bytes | None] = {}
    for key, value in properties.items():
        by_key.setdefault(key.decode("ascii", errors="replace").lower(), value)
    port = int(_matching(by_key, "port", _NUMBER))
    if not 1 <= port <= 65535:
        raise Malformed(f"port={port} is out of range")
    if not addresses:
        raise Malformed("no address records")
    for address in addresses:
        try:
            ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise Malformed(f"address {address[:60]!r} is not an IP address") from None
    return Candidate(
        node_id=_matching(by_key, "node", _NODE_ID),
        cluster_id=_matching(by_key, "cluster", _CLUSTER_ID),
        proto=_matching(by_key, "proto", _VERSION),
        addresses=tuple(addresses),
        port=port,
        name=name,
        own=own,
    )


def machine_addresses() -> list[str]:
    """Every IP address of this machine's interfaces (IPv6 without its scope)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return found


def announced_addresses(interfaces: Sequence[str] | None, machine: Iterable[str]) -> list[str]:
    """What to announce: the pinned addresses, each of which must be this machine's; or, with
    None, every IPv4 address but loopback (zeroconf's default, IPv4 only, is what we use)."""
    mine = list(dict.fromkeys(machine))
    if interfaces is None:
        found = [a for a in mine if ipaddress.ip_address(a).version == 4]
        found = [a for a in found if not ipaddress.ip_address(a).is_loopback]
        if not found:
            raise DiscoveryError("mDNS: this machine has no network address to announce")
        return found
    if not interfaces:
        raise DiscoveryError("mDNS: the list of interface addresses is empty")
    for address in interfaces:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise DiscoveryError(f"mDNS: {address!r} is not an IP address") from None
        if address not in mine:
            raise DiscoveryError(
                f"mDNS: {address} is not an address of this machine (it has "
                f"{', '.join(mine) or 'none'}): set EXOD_MDNS_INTERFACES to addresses of its own "
                "interfaces, or leave it empty for all"
            )
    return list(dict.fromkeys(interfaces))


class Discovery:
    """Announce `me` (its peer service on `port`) and report the others, until `stop()`.

    `on_seen` gets each service resolved, again when its records change (same `name`, new
    fields); `on_gone` the last seen state of a service that said goodbye, expired, or now
    announces what does not parse."""

    def __init__(
        self,
        me: Me,
        port: int,
        *,
        interfaces: list[str] | None,
        on_seen: Report,
        on_gone: Report,
        reach: Sequence[str] | None = None,
    ) -> None:
        """`reach`: the addresses the peer port listens on, announced in place of the
        interfaces' own when it is bound to one address (EXOD_PEER_BIND) rather than all."""
        self._txt = txt_records(me, port)  # raises on an id we could not announce: a bug
        self._me = me
        self._port = port
        self._interfaces = interfaces
        self._reach = list(reach) if reach else None
        self._on_seen = on_seen
        self._on_gone = on_gone
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._own_name = ""
        self._seen: dict[str, Candidate] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._warned: set[str] = set()

    async def start(self) -> None:
        """Start answering, browsing and announcing; DiscoveryError when it cannot."""
        addresses = announced_addresses(self._interfaces, machine_addresses())
        # An address the peer port is not bound to would send members where nobody answers.
        addresses = self._reach or addresses
        try:
            if self._interfaces is None:
                self._zc = AsyncZeroconf(
                    interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only
                )
            else:  # zeroconf picks the IP version from the addresses
                self._zc = AsyncZeroconf(interfaces=list(self._interfaces))
        except OSError as e:  # port 5353 taken by a stack that does not share it, say
            raise DiscoveryError(f"mDNS cannot start: {e.strerror or e}") from e
        try:
            await self._announce_and_browse(addresses)
        except Exception as e:
            await self.stop()
            raise DiscoveryError(f"mDNS cannot start: {e}") from e

    async def _announce_and_browse(self, addresses: list[str]) -> None:
        assert self._zc is not None
        # Browse first: finding the others need not wait for our own name's probing (~1 s).
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._changed]
        )
        # The host name is per start: two processes announcing one node id (a copied home)
        # must not merge into one host with both machines' addresses.
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{self._me.node_id}.{SERVICE_TYPE}",
            port=self._port,
            properties=self._txt,
            server=f"exod-{secrets.token_hex(6)}.local.",
            parsed_addresses=addresses,
        )
        # A name already taken (our id on another machine) is renamed, not refused: the copy is
        # then reported by its TXT `node`, as a duplicate, instead of staying invisible.
        await self._zc.async_register_service(self._info, allow_name_change=True)
        self._own_name = self._info.name

    async def stop(self) -> None:
        """Say goodbye (peers see this node leave at once) and close; no callback after this."""
        self._on_seen = self._on_gone = _ignore
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in self._resolving.values():
            task.cancel()
        await asyncio.gather(*self._resolving.values(), return_exceptions=True)
        self._resolving.clear()
        if self._zc is not None:
            if self._info is not None and self._own_name:
                try:
                    await (await self._zc.async_unregister_service(self._info))
                except Exception as e:  # a goodbye that cannot be sent must not stop the close
                    log.warning("mDNS goodbye not sent: %s", e)
            await self._zc.async_close()
        self._zc = self._browser = self._info = None

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf's browser callback, on the loop: resolve what appeared or changed; report
        what left."""
        previous = self._resolving.pop(name, None)
        if previous is not None:
            previous.cancel()  # a newer state of the same service supersedes it
        if state_change is ServiceStateChange.Removed:
            gone = self._seen.pop(name, None)
            if gone is not None:
                self._report(self._on_gone, gone)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, name))
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._forget(name, done))

    def _forget(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _resolve(self, zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
                log.debug("mDNS: %s did not answer within %d ms", name, RESOLVE_TIMEOUT_MS)
                return
            candidate = parse(
                name,
                info.properties,
                info.parsed_scoped_addresses(),
                own=bool(self._own_name) and name.lower() == self._own_name.lower(),
            )
        except Exception as e:  # whatever the LAN sent, the adapter goes on
            self._warn_once(name, (str(e) or type(e).__name__)[:200])
            spoiled = self._seen.pop(name, None)  # it announced well before: it no longer does
            if spoiled is not None:
                self._report(self._on_gone, spoiled)
            return
        if self._seen.get(name) != candidate:
            self._seen[name] = candidate
            self._report(self._on_seen, candidate)

    def _warn_once(self, name: str, why: str) -> None:
        # Once per service: a device that re-announces garbage must not flood the log (nor,
        # with endless new names, this set).
        level = logging.DEBUG if name in self._warned else logging.WARNING
        if len(self._warned) >= WARNED_NAMES:
            self._warned.clear()
        self._warned.add(name)
        log.log(
            level, "mDNS: ignored %.80r on the network, not an exod announcement: %s", name, why
        )

    @staticmethod
    def _report(callback: Report, candidate: Candidate) -> None:
        try:
            callback(candidate)
        except Exception:  # the caller's bug: log it whole, keep discovering
            log.exception("mDNS: the discovery callback failed on %s", candidate.name)


def _ignore(candidate: Candidate) -> None:
    """The callback after stop()."""
