"""The one exception hierarchy of vhdcore.

Every error that vhdcore raises on purpose is a :class:`VhdError`.  Messages
say what is wrong and where: the file, the field or offset, the block.
"""
from __future__ import annotations

__all__ = [
    "VhdError",
    "FormatError",
    "ChecksumError",
    "ChainError",
    "ParentNotFoundError",
    "ParentMismatchError",
    "ChainCycleError",
    "ChainDepthError",
    "ConfinementError",
    "IntegrityError",
    "CoalesceError",
    "CheckpointError",
    "NoSpaceError",
    "StoreError",
    "StoreAuthError",
    "StoreNotFoundError",
    "UploadError",
    "VhdTimeoutError",
    "JobStateError",
    "OutputExistsError",
]


class VhdError(Exception):
    """Base class of every error vhdcore raises on purpose."""


class FormatError(VhdError, ValueError):
    """A file is not a valid VHD, or a structure in it is damaged."""


class ChecksumError(FormatError):
    """A footer or dynamic header checksum does not match its contents."""


class ChainError(VhdError):
    """A differencing chain cannot be resolved or is inconsistent."""


class ParentNotFoundError(ChainError):
    """No parent locator of a differencing disk leads to an existing file."""


class ParentMismatchError(ChainError):
    """The parent found does not match the child (UUID, block size)."""


class ChainCycleError(ChainError):
    """Following parent locators leads back to a disk already in the chain."""


class ChainDepthError(ChainError):
    """The chain is deeper than the configured limit."""


class ConfinementError(ChainError):
    """A parent path leaves the directories the caller allowed, or is not a regular file."""


class IntegrityError(VhdError):
    """Data does not match its recorded digest (image stream, segment, checkpoint)."""


class CoalesceError(VhdError):
    """A coalesce, flatten, compact or repair cannot be done safely."""


class CheckpointError(CoalesceError):
    """A coalesce checkpoint belongs to other files, or they changed since it was written."""


class NoSpaceError(VhdError):
    """Not enough free space for an operation; ``needed`` and ``available`` are in bytes."""

    def __init__(self, message: str, needed: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class StoreError(VhdError):
    """An object store target failed or refused an operation."""


class StoreAuthError(StoreError):
    """The object store rejected the credentials."""


class StoreNotFoundError(StoreError):
    """The container, bucket, directory or object does not exist."""


class UploadError(StoreError):
    """An upload could not be completed (after retries)."""


class VhdTimeoutError(VhdError, TimeoutError):
    """An operation reached its deadline; it left a checkpoint and can be resumed."""


class JobStateError(VhdError):
    """An imaging job state file is damaged or belongs to another job."""


class OutputExistsError(VhdError, FileExistsError):
    """The output file or stored image already exists and the caller did not
    ask to overwrite it (``--force``, or ``--replace`` for a stored image)."""
