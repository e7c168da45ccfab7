"""What the replica pool raises to its callers."""

from __future__ import annotations

import grpc


class PoolError(Exception):
    """A request could not be placed: the gRPC status to answer with, and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class StartupError(Exception):
    """No replica could start (each one's first attempt failed): the router cannot serve."""
