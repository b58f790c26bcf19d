"""Exceptions Kiln raises on purpose; each carries a message meant for the user."""


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
