"""Password hashes for the console's users: argon2id with the library's current parameters."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["MIN_LENGTH", "hash_password", "verify_password"]

#: Shortest password ``dicomai users add`` accepts.
MIN_LENGTH = 10


@functools.cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id, RFC 9106's low-memory profile


@functools.cache
def _dummy_hash() -> str:
    return _hasher().hash("no such user")


def hash_password(password: str) -> str:
    """The hash to store; ValueError for a password shorter than :data:`MIN_LENGTH`."""
    if len(password) < MIN_LENGTH:
        raise ValueError(f"a password needs at least {MIN_LENGTH} characters")
    return _hasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; ``None`` (no such user) costs the same time and fails."""
    try:
        ok = _hasher().verify(password_hash or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return ok and password_hash is not None
