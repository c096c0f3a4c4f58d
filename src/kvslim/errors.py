"""Errors kvslim raises for bad input.

Every error a user can cause derives from :class:`KvslimError`; the CLI prints its message as one line and exits
non-zero, without a traceback. Messages say what was wrong and what to do instead.
"""

from __future__ import annotations

__all__ = ["KvslimError", "InvalidInput", "MissingModelPackage", "ContextTooLong", "ColdTierError", "KvslimWarning"]


class KvslimError(Exception):
    """Base class of every user-facing kvslim error."""


class InvalidInput(KvslimError, ValueError):
    """An argument, name or value that kvslim cannot use (unknown name, bad number, empty prompt, ...)."""


class MissingModelPackage(KvslimError, ImportError):
    """An embedded model whose PyPI package is not installed; the message holds the install command."""


class ContextTooLong(InvalidInput):
    """A prompt or context longer than the model allows; the message gives both numbers."""


class KvslimWarning(UserWarning):
    """Something kvslim worked around but the user should know (the CLI prints it as one ``warning: ...`` line)."""


class ColdTierError(KvslimError, OSError):
    """The cold tier of a tiered cache failed under a live cache (its file deleted or truncated, the disk full); the
    message names the file. The cache cannot answer correctly any more and must be rebuilt."""
