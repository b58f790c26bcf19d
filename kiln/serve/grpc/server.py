"""`GrpcFrontEnd`: the gRPC server on `--grpc-port`, started and stopped by the REST app's lifespan.

It serves `kiln.v1.Generation` (kiln.serve.grpc.service), the standard health-checking service
(`grpc.health.v1.Health`) and server reflection, on `--host` beside the REST port, over the same app and
engine.

Rules:
- Health follows /ready: SERVING for the overall server ("") and `kiln.v1.Generation` once the engine runs
  and while it is neither restarting, failed nor draining; NOT_SERVING otherwise. The state is read from the
  app's `Admission` at each Check, and every `HEALTH_POLL_SECONDS` for Watch streams.
- The largest request message accepted is `--max-body-bytes`, as for a REST body.
- `stop()` (the app's shutdown, after the drain began): health NOT_SERVING, no new calls, calls in flight
  given `drain_timeout_seconds` plus one second (the drain ends them with UNAVAILABLE at the timeout itself),
  then cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from starlette.types import ASGIApp

from kiln.serve.grpc import kiln_pb2, kiln_pb2_grpc
from kiln.serve.grpc.service import GenerationService
from kiln.serve.state import ServerState

logger = logging.getLogger("kiln.serve")

SERVICE_NAME = kiln_pb2.DESCRIPTOR.services_by_name["Generation"].full_name  # kiln.v1.Generation
HEALTH_POLL_SECONDS = 0.1


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Health(health.aio.HealthServicer):
    """gRPC's health service whose statuses follow `serving()`: brought up to date before each Check, and
    every `HEALTH_POLL_SECONDS` by `follow()` for Watch streams."""

    def __init__(self, serving: Callable[[], bool]) -> None:
        super().__init__()
        self._serving = serving
        self._last: bool | None = None

    async def sync(self) -> None:
        now = self._serving()
        if now != self._last:
            self._last = now
            status = (
                health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for service in ("", SERVICE_NAME):
                await self.set(service, status)

    async def Check(  # the rpc's name in health.proto
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await self.sync()
        return await super().Check(request, context)

    async def follow(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(HEALTH_POLL_SECONDS)


class GrpcFrontEnd:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.port: int | None = None  # the bound port, once started (the setting may be 0: any free port)
        self._server: grpc.aio.Server | None = None
        self._health = _Health(self._serving)
        self._watch: asyncio.Task[None] | None = None

    def _serving(self) -> bool:
        a = self.state.admission
        return a.ready and not a.draining and a.down is None and a.failed is None

    async def start(self) -> None:
        settings = self.state.settings
        assert settings.grpc_port is not None
        limit = settings.max_body_bytes
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
        kiln_pb2_grpc.add_GenerationServicer_to_server(GenerationService(self.app), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (
            SERVICE_NAME,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = _address(settings.host, settings.grpc_port)
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {address}: {exc}") from None
        await server.start()
        self._server = server
        self._watch = asyncio.ensure_future(self._health.follow())
        logger.info("gRPC (%s, health, reflection) on %s", SERVICE_NAME, _address(settings.host, self.port))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace=self.state.settings.drain_timeout_seconds + 1)
