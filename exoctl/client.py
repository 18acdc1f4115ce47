"""The gRPC client for exod's control socket: one channel, one method per RPC, failures as
Failure.

The synchronous API is enough for a CLI that makes one call per command. Unary calls get a
deadline so that a wedged daemon cannot hang a script; the streaming calls (a generation, a
followed event log) run as long as they need and end on cancel.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from exoctl.failures import Failure, from_rpc_error, one_line
from exod import API_VERSION
from exod.errors import Exit
from exod.home import MAX_SOCKET_PATH
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc

# Prompts of a few megabytes must fit; gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
UNARY_TIMEOUT_S = 10.0
# A join waits on another machine, bounded by exod's EXOD_PEER_TIMEOUT (up to this much).
JOIN_TIMEOUT_S = 300.0
# A plan may wait for mlx-lm to say whether the model can be split (a subprocess in exod, bounded
# by its own 60 s).
PLACE_TIMEOUT_S = 90.0
# Lets exod refuse (or adapt to) a client from another release.
METADATA = (("exo-api-version", API_VERSION),)

Req = TypeVar("Req")
Rep = TypeVar("Rep")


class Client:
    """A connection to one exod; use it as a context manager so the channel is closed."""

    def __init__(self, socket: Path) -> None:
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise Failure(
                Exit.USAGE,
                one_line(
                    f"socket path {socket} is longer than {MAX_SOCKET_PATH} bytes",
                    "give a shorter one with --socket or EXOD_SOCKET",
                ),
            )
        self.socket = socket
        self._channel = grpc.insecure_channel(
            f"unix:{socket}",
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # `status --wait` polls a socket that is not there yet: retry often, not after
                # gRPC's default backoff of a second and more. Not min_reconnect_backoff_ms:
                # gRPC also takes it as the time a connection has to finish its handshake, and
                # a busy exod on a loaded machine can take more than a fraction of a second.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 250),
            ],
        )
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Closing also cancels a call still in flight, so the daemon stops its work for us.
        self._channel.close()

    def failure(self, err: grpc.RpcError, *, mid_stream: bool = False) -> Failure:
        return from_rpc_error(err, str(self.socket), mid_stream=mid_stream)

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Rep],
        request: Req,
        timeout: float = UNARY_TIMEOUT_S,
    ) -> Rep:
        try:
            # Not wait_for_ready: a daemon that is not there must fail now, with 69.
            return method(request, timeout=timeout, metadata=METADATA, wait_for_ready=False)
        except grpc.RpcError as e:
            raise self.failure(e) from None

    def status(self, wait: float = 0.0) -> control_pb2.StatusReply:
        """exod's status; with `wait`, first wait up to that many seconds for exod to answer
        (a script that has just started it)."""
        if wait <= 0:
            return self._unary(self._stub.Status, control_pb2.StatusRequest())
        try:
            return self._stub.Status(
                control_pb2.StatusRequest(), timeout=wait, metadata=METADATA, wait_for_ready=True
            )
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self.failure(e) from None
            raise Failure(
                Exit.UNAVAILABLE,
                one_line(
                    f"exod did not answer within {wait:g}s on {self.socket}",
                    "is it running? its log says why it did not start",
                ),
            ) from None

    def kill(self, runner_id: str | None) -> control_pb2.KillReply:
        """Kill one runner, or all of them when runner_id is None."""
        request = control_pb2.KillRequest(runner_id=runner_id or "", all=runner_id is None)
        return self._unary(self._stub.Kill, request)

    def models(self, request: control_pb2.ModelsRequest) -> control_pb2.ModelsReply:
        return self._unary(self._stub.Models, request)

    def cluster_init(self) -> control_pb2.ClusterReply:
        return self._unary(self._stub.ClusterInit, control_pb2.ClusterInitRequest())

    def cluster_invite(self, ttl_s: int) -> control_pb2.ClusterInviteReply:
        return self._unary(self._stub.ClusterInvite, control_pb2.ClusterInviteRequest(ttl_s=ttl_s))

    def cluster_join(self, token: str) -> control_pb2.ClusterReply:
        request = control_pb2.ClusterJoinRequest(token=token)
        return self._unary(self._stub.ClusterJoin, request, JOIN_TIMEOUT_S)

    def cluster_remove(self, node_id: str) -> control_pb2.ClusterRemoveReply:
        request = control_pb2.ClusterRemoveRequest(node_id=node_id)
        return self._unary(self._stub.ClusterRemove, request)

    def cluster_leave(self) -> control_pb2.ClusterReply:
        # It waits for the CA's node, as a join waits for the inviter.
        request = control_pb2.ClusterLeaveRequest()
        return self._unary(self._stub.ClusterLeave, request, JOIN_TIMEOUT_S)

    def place(self, request: control_pb2.PlaceRequest) -> control_pb2.PlaceReply:
        return self._unary(self._stub.Place, request, PLACE_TIMEOUT_S)

    def run(self, request: control_pb2.RunRequest) -> grpc.CallIterator[control_pb2.RunReply]:
        """The generation's replies; RpcErrors surface while iterating (see self.failure)."""
        return self._stub.Run(request, metadata=METADATA, wait_for_ready=False)

    def import_model(
        self, request: control_pb2.ImportRequest
    ) -> grpc.CallIterator[control_pb2.ImportReply]:
        """An import's progress, then its result; RpcErrors surface while iterating."""
        return self._stub.Import(request, metadata=METADATA, wait_for_ready=False)

    def events(
        self, request: control_pb2.EventsRequest
    ) -> grpc.CallIterator[control_pb2.EventRecord]:
        return self._stub.Events(request, metadata=METADATA, wait_for_ready=False)


def cancel(call: grpc.RpcContext) -> None:
    """Cancel a streaming call; exod sees the cancellation and stops the work behind it."""
    call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated
