"""Container engines (Docker, Podman) over their API socket: finding it, and talking to it."""

from gateway.engine.client import EngineClient, ExecResult, ExecStream, Ping
from gateway.engine.discovery import Discovery, find_engine
from gateway.engine.errors import (
    Attempt,
    BadRequest,
    Conflict,
    EngineError,
    EngineNotFound,
    EngineUnavailable,
    NotFound,
    ServerError,
    StreamError,
)
from gateway.engine.stream import FrameDemuxer, Stream

__all__ = [
    "Attempt",
    "BadRequest",
    "Conflict",
    "Discovery",
    "EngineClient",
    "EngineError",
    "EngineNotFound",
    "EngineUnavailable",
    "ExecResult",
    "ExecStream",
    "FrameDemuxer",
    "NotFound",
    "Ping",
    "ServerError",
    "Stream",
    "StreamError",
    "find_engine",
]
