"""The plan for a model over this node and the members it reaches now: what `exoctl place`
prints and what `exoctl run` follows (the pure part is placement.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import psutil

from exod.cluster.control import Cluster
from exod.cluster.placement import Member, Plan, place, usable_memory
from exod.config import Settings
from exod.eventlog import running_elsewhere
from exod.journal import Journal
from exod.models.inspect import ModelFiles, content_hash
from exod.models.pipeline_check import PipelineCheck
from exod.models.shape import read_shape
from exod.runners.supervisor import Supervisor


class Planner:
    def __init__(
        self,
        settings: Settings,
        node_id: str,
        cluster: Cluster,
        supervisor: Supervisor,
        journal: Journal,
    ) -> None:
        self._settings = settings
        self._id = node_id
        self._cluster = cluster
        self._supervisor = supervisor
        self._journal = journal
        self._pipeline = PipelineCheck()

    async def members(self) -> list[Member]:
        """This node and, in a cluster, every member it knows, with the room each has now."""
        s = self._settings
        vm = await asyncio.to_thread(psutil.virtual_memory)
        room = usable_memory(vm.available, s.reserved_memory, s.max_runner_memory)
        me = Member(self._id, room, state="self", has_model=True, name=s.node_name)
        cluster = self._cluster
        if cluster.info() is None:
            return [me]
        others = [
            Member(n.id, cluster.replication.room(n.id), state=n.state, name=n.name)
            for n in cluster.replication.nodes(time.time())
        ]
        return [me, *others]

    async def plan(
        self, files: ModelFiles, forced: list[str], members: list[Member] | None = None
    ) -> Plan:
        """Where the model in `files` runs (placement.place over the members now)."""
        shape = await asyncio.to_thread(read_shape, files.path)
        if members is None:
            members = await self.members()
        live = self._supervisor.live_for(str(files.path))
        digest = await asyncio.to_thread(content_hash, files.path)
        # Where it runs already: here, or on members whose runners run the same content.
        loaded = [self._id] if live is not None else []
        loaded += running_elsewhere(self._journal.state, digest)

        def plan_for(pipeline: bool) -> Plan:
            return place(
                replace(shape, pipeline=pipeline),
                members,
                local_id=self._id,
                loaded_on=loaded,
                forced=forced,
            )

        # Asking mlx-lm takes a subprocess: only when the answer can change the plan.
        plan = plan_for(True)
        if plan.whole_on is None and (
            plan.refused is None or plan.refused.reason == "model_too_large"
        ):
            plan = plan_for(await self._pipeline.supports(files.path, digest))
        return replace(plan, content_hash=digest)
