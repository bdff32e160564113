"""The errors of ``lorakit serve``, typed by what went wrong, not by HTTP status.

The engine, the adapter store and the front object raise these; the app maps each class to a status code in
one table (:data:`lorakit.serve.app.STATUS`). ``param`` names the request field at fault, when there is one.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error a request can end with; ``str(e)`` is the one-line message the client sees."""

    kind = "server_error"  # OpenAI's ``error.type``

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class InvalidRequest(ServeError, ValueError):
    """The request cannot be served as asked (too long for the context, a field this model cannot honour)."""

    kind = "invalid_request_error"


class PathRefused(InvalidRequest):
    """An adapter name or path that escapes ``--adapters-dir`` or cannot exist."""


class AdapterNotFound(ServeError, LookupError):
    """A model name that is neither the base nor a known adapter."""

    kind = "not_found_error"

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message, param)


class Conflict(ServeError):
    """The request clashes with the server's state (unloading an adapter that has requests running)."""

    kind = "invalid_request_error"


class AdapterLoadFailed(ServeError, RuntimeError):
    """An adapter that cannot be loaded (corrupt, made for another base): its requests fail, the server goes on."""

    kind = "adapter_error"

    def __init__(self, message: str, param: str | None = "model"):
        super().__init__(message, param)


class Overloaded(ServeError):
    """The server cannot take the request now (shutting down, queue full); the client may retry."""

    kind = "unavailable"


class InternalError(ServeError, RuntimeError):
    """A bug in one engine step: it fails the rows of that step, not the server."""
