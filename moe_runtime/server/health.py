"""The server's serving phase, mirrored into `grpc.health.v1`: NOT_SERVING while loading, draining,
recovering from a lost worker or after the engine died; SERVING only in between. New generation requests are accepted only while SERVING."""

from __future__ import annotations

import enum

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio


class Phase(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    RECOVERING = "recovering"  # the executor lost a worker and is rebuilding; SERVING again after
    DEAD = "dead"


class ServingState:
    """Owns the phase; `services` are the names reported besides the overall "" entry."""

    def __init__(self, services: tuple[str, ...] = ()):
        self.health = health_aio.HealthServicer()  # starts SERVING for ""; set() below fixes that before binding
        self.services = ("", *services)
        self.phase = Phase.LOADING

    async def set(self, phase: Phase) -> None:
        if self.phase is Phase.DEAD:  # a dead engine stays dead
            return
        self.phase = phase
        status = (health_pb2.HealthCheckResponse.SERVING if phase is Phase.SERVING
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.services:
            await self.health.set(name, status)

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.SERVING
