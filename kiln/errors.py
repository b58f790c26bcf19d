"""Exceptions Kiln raises on purpose; each carries a message meant for the user."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln raises for a user to read."""


class InvalidEngineError(KilnError):
    """An engine directory is missing, corrupt, partial, or built for something else."""


class CheckpointError(KilnError):
    """A checkpoint cannot be read or is not a Llama-family model."""


class OfflineError(KilnError):
    """Something had to be downloaded and the network (or hub) is not reachable."""


class BackendUnavailableError(KilnError):
    """An optional backend (e.g. TensorRT-LLM) is not installed here."""


class EngineDeadError(RuntimeError):
    """The engine failed or stopped (its step loop, its process, or a tensor-parallel rank); the request
    could not be completed. Re-exported by kiln.clients.messages, where the drivers raise it."""


class RequestValidationError(KilnError, ValueError):
    """A request an engine can never run (bad parameter, prompt too long, token id outside the vocabulary).

    `field` names the request field at fault ("prompt", "max_tokens", "logit_bias", ...; None when no
    one field is), so a server reports it (OpenAI's `param`) without reading the message. A ValueError,
    as callers of the engines have always caught.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[type[RequestValidationError], tuple[str, str | None]]:
        # Keeps `field` when the error crosses a process boundary (pickled by the process driver).
        return type(self), (str(self), self.field)
