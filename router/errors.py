"""What the replica pool raises to its callers, and how a request fails."""

from __future__ import annotations

import grpc


class PoolError(Exception):
    """A request could not be placed: the gRPC status to answer with, and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RequestFailed(Exception):
    """A request refused, or ended before its last chunk: the status (gRPC's codes are the router's vocabulary;
    the HTTP front door maps them to HTTP statuses) and why; `field` names the request field it is about, if one
    is (the text is then "field: message")."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code, self.message, self.field = code, message, field


class StartupError(Exception):
    """No replica could start (each one's first attempt failed): the router cannot serve."""
