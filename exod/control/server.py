"""The gRPC server on the Unix socket: Control, the standard health service, reflection."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from exod.control.service import ControlService
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc

CONTROL = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name
# Prompts of a few MB must fit; gRPC's default of 4 MB would refuse them with a vague error.
MAX_MESSAGE = 16 * 1024 * 1024


class SocketInUse(Exception):
    """Another live server answers on the socket path."""


def prepare_socket(path: Path) -> None:
    """Create the socket's directory privately and clear a stale socket left by a crash."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover of an exod that died
    else:
        raise SocketInUse(f"another server already listens on {path}")
    finally:
        probe.close()


async def start(path: Path, control: ControlService) -> tuple[grpc.aio.Server, HealthServicer]:
    """Serve `control` on the socket at path, which prepare_socket has cleared."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    control_pb2_grpc.add_ControlServicer_to_server(control, server)
    checker = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(
        (CONTROL, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # only its user may talk to exod
    for service in ("", CONTROL):
        await checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, checker


async def set_serving(checker: HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", CONTROL):
        await checker.set(service, status)
