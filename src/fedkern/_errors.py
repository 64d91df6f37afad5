"""The exceptions fedkern raises on purpose, re-exported by :mod:`fedkern`."""
from __future__ import annotations


class FedkernError(Exception):
    """Base class of every error fedkern raises on purpose."""


class FedkernValueError(FedkernError, ValueError):
    """An argument has the right type but a bad value, shape or length."""


class FedkernTypeError(FedkernError, TypeError):
    """An argument has the wrong type or dtype."""


class NonFiniteError(FedkernValueError):
    """A NaN or infinity was met in a client's update, or a result overflowed.

    Attributes
    ----------
    client : int or None
        Index of the offending update, or None when every input was finite and the
        result itself overflowed its dtype.
    position : int or None
        First offending coordinate within that update (or within the result).
    """

    def __init__(self, message: str, client: int | None = None, position: int | None = None):
        super().__init__(message)
        self.client = client
        self.position = position


class WorkerError(FedkernError, RuntimeError):
    """A worker process of an executor died outside a chunk's training (while it took the
    trainer or a new arena; one that dies training is replaced and its chunks retried), or
    a chunk's exception could not be sent back (the message then holds the worker's
    traceback)."""


class BackendUnavailableError(FedkernError, ImportError):
    """The requested backend cannot be imported on this machine."""
