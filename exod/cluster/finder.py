"""mDNS discovery for as long as this node belongs to a cluster, feeding what it finds to
Replication (which follows members and lists the refused).

Discovery runs only on a member: a node in no cluster announces nothing. Its lifetime follows the
membership, which the event log shows: it starts at exod's start on a member, when `cluster init`
or `join` makes this node one (ClusterEntered), and stops when the node leaves a cluster or exod
stops. At exod's start, mDNS that cannot start (a pinned address this machine lacks) refuses the
start: a setting to fix. Once serving, the cluster works without mDNS (members' addresses are in
the log), so a failure then is logged and exod goes on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from contextlib import suppress

from exod.cluster.candidates import Act, Candidate, Me, explain
from exod.cluster.control import Cluster
from exod.cluster.discovery import Discovery, DiscoveryError
from exod.cluster.protocol import PROTOCOL_VERSION
from exod.journal import Journal

log = logging.getLogger("exod.discovery")


class Finder:
    def __init__(
        self,
        node_id: str,
        cluster: Cluster,
        journal: Journal,
        *,
        port: int,
        bind: str,
        interfaces: tuple[str, ...],
    ) -> None:
        """`port` and `bind`: the peer port and the address it listens on (EXOD_PEER_BIND);
        `interfaces`: the addresses to pin mDNS to (EXOD_MDNS_INTERFACES); empty: all."""
        self._id = node_id
        self._cluster = cluster
        self._journal = journal
        self._port = port
        # Bound to one address, the peer port is reached there only: announce that one.
        self._reach = None if ipaddress.ip_address(bind).is_unspecified else [bind]
        self._interfaces = list(interfaces) or None
        self._me: Me | None = None
        self._discovery: Discovery | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Discover now if this node is a member, and from whenever it becomes one. Pinned
        (EXOD_MDNS_INTERFACES), mDNS that cannot start raises DiscoveryError: the setting is
        wrong. Unpinned, it is logged: a machine with no network yet must still start."""
        try:
            await self._follow_membership()
        except DiscoveryError as e:
            if self._interfaces is not None:
                raise
            self._without_mdns(e)
        self._watch = asyncio.create_task(self._watch_membership())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._stop_discovery()

    def _wanted(self) -> Me | None:
        info = self._cluster.info()
        if info is None:
            return None
        return Me(node_id=self._id, cluster_id=info.id, proto=PROTOCOL_VERSION)

    async def _follow_membership(self) -> None:
        """Start, stop or restart discovery so that it announces the cluster this node is in."""
        wanted = self._wanted()
        if wanted == self._me:
            return
        await self._stop_discovery()
        if wanted is None:
            return
        me = wanted
        discovery = Discovery(
            me,
            self._port,
            interfaces=self._interfaces,
            on_seen=lambda c: self._seen(c, me),
            on_gone=self._cluster.replication.gone,
            reach=self._reach,
        )
        try:
            await discovery.start()
        except asyncio.CancelledError:  # exod stopping meanwhile: close what was opened
            await discovery.stop()
            raise
        self._me, self._discovery = me, discovery
        pinned = ", ".join(self._interfaces) if self._interfaces else "every interface"
        log.info("mDNS: announcing node %s of cluster %s on %s", me.node_id, me.cluster_id, pinned)

    async def _stop_discovery(self) -> None:
        discovery, self._discovery, self._me = self._discovery, None, None
        if discovery is not None:
            await discovery.stop()

    async def _watch_membership(self) -> None:
        while True:
            seen = self._journal.state.last_seq
            try:
                await self._follow_membership()
            except DiscoveryError as e:
                self._without_mdns(e)
            await self._journal.wait_beyond(seen)

    def _without_mdns(self, e: DiscoveryError) -> None:
        # The members' addresses in the log still reach them.
        log.error("%s; going on without mDNS (members are reached where their log says)", e)
        # Tried again at the next change of membership, not at every event.
        self._me = self._wanted()

    def _seen(self, candidate: Candidate, me: Me) -> None:
        act = self._cluster.replication.seen(candidate, me)
        if act is Act.REFUSE:
            log.warning("mDNS: %s", explain(candidate, me))
        elif act is not Act.IGNORE:
            log.info("mDNS: %s", explain(candidate, me))
