"""Errors raised while reading, converting and storing adapters.

Every refusal is an `AdapterError` whose message names the problem (the file, tensor,
module or field, and the values involved); the server maps it to INVALID_ARGUMENT.
The subclasses let the server pick a more precise status without parsing messages.
"""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter (or an adapter id or path) was refused. -> INVALID_ARGUMENT"""


class AdapterNotFound(AdapterError):
    """No adapter with this id, or no directory at this path. -> NOT_FOUND"""


class AdapterExists(AdapterError):
    """An adapter with this id is already stored (and replace was not asked). -> ALREADY_EXISTS"""


class AdapterTooLarge(AdapterError):
    """An upload or a file is over its byte cap. -> RESOURCE_EXHAUSTED (or INVALID_ARGUMENT)"""
