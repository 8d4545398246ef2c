"""Errors the engine raises at submission; the servicer maps each to one gRPC status."""


class EngineError(Exception):
    """Base class."""


class InvalidRequest(EngineError, ValueError):
    """Bad arguments (INVALID_ARGUMENT)."""


class UnknownAdapter(EngineError, KeyError):
    """No adapter with that id (NOT_FOUND). Never served as the base model."""

    def __str__(self) -> str:  # KeyError quotes its argument
        return str(self.args[0]) if self.args else "unknown adapter"


class QueueFull(EngineError):
    """The waiting queue is at capacity (RESOURCE_EXHAUSTED)."""


class EngineDraining(EngineError):
    """The engine is shutting down and takes no new requests (UNAVAILABLE)."""
