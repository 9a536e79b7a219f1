"""The core's exception hierarchy. `server/inferd/api/status.py` maps each class to one gRPC
code."""

from __future__ import annotations

QUOTE_LIMIT = 200


def quoted(value: object) -> str:
    """`value` as an error message quotes it: repr'd, and at most QUOTE_LIMIT characters of
    it, so that a client's 100k-character name cannot make the status itself too large."""
    return clipped(repr(value))


def clipped(text: str) -> str:
    """At most QUOTE_LIMIT characters of `text`, saying how long it was."""
    if len(text) <= QUOTE_LIMIT:
        return text
    return f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"


class InferdError(Exception):
    """Base of every error the core reports to a caller. The message names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(InferdError):
    """No such model, or no such (or no READY) version of it."""


class InvalidInput(InferdError):
    """The request does not match what the model declares, or breaks a limit."""


class QueueFull(InferdError):
    """The version's queue is at max_queue_size; answered at once, never queued."""


class DeadlineExceeded(InferdError):
    """The request's deadline passed before it could be executed or answered."""


class Cancelled(InferdError):
    """The caller went away before the request was executed."""


class Unavailable(InferdError):
    """The server or the model version is shutting down or not ready."""


class Unauthenticated(InferdError):
    """A control-plane call without valid credentials."""


class PermissionDenied(InferdError):
    """A control-plane call with credentials that do not grant it."""


class FailedPrecondition(InferdError):
    """The call cannot run in the server's current configuration or state (e.g. a load RPC
    outside explicit model control, or a model whose files do not load)."""


class InferenceFailed(InferdError):
    """The runtime failed while executing the batch that held this request."""
