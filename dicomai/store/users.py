"""SQL for the web console's users and their login sessions.

Passwords arrive here already hashed (:mod:`dicomai.web.passwords`) and session tokens as
their SHA-256: nothing in the database logs anyone in. Every function takes the caller's
session and does not commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from dicomai.store.models import User, UserRole, WebSession

__all__ = [
    "Account",
    "add_user",
    "end_session",
    "find_user",
    "list_users",
    "purge_sessions",
    "remove_user",
    "session_account",
    "start_session",
]


@dataclass(frozen=True)
class Account:
    """A user as the console sees one: no password hash."""

    id: int
    name: str
    role: UserRole
    created_at: dt.datetime

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


def _account(user: User) -> Account:
    return Account(user.id, user.name, UserRole(user.role), user.created_at)


def add_user(session: Session, name: str, role: UserRole, password_hash: str,
             now: dt.datetime) -> Account | None:
    """Add a user; ``None`` when the name is taken (nothing changed)."""
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        return None
    user = User(name=name, role=str(role), password_hash=password_hash, created_at=now)
    session.add(user)
    session.flush()
    return _account(user)


def remove_user(session: Session, name: str) -> bool:
    """Remove a user and end their sessions; ``False`` when there is no such user."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        return False
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    session.delete(user)
    return True


def list_users(session: Session) -> list[Account]:
    """Every user, by name."""
    return [_account(u) for u in session.scalars(select(User).order_by(User.name))]


def find_user(session: Session, name: str) -> tuple[Account, str] | None:
    """A user and their password hash, for a login."""
    user = session.scalar(select(User).where(User.name == name))
    return None if user is None else (_account(user), user.password_hash)


def start_session(session: Session, user_id: int, token_sha256: str, now: dt.datetime,
                  expires_at: dt.datetime) -> None:
    """Record a new login session."""
    session.add(WebSession(token_sha256=token_sha256, user_id=user_id, created_at=now, last_seen_at=now,
                           expires_at=expires_at))


def session_account(session: Session, token_sha256: str, now: dt.datetime,
                    idle: dt.timedelta) -> Account | None:
    """The user of a live session, marking it used at ``now``; ``None`` for an unknown,
    expired or idle session (which is ended)."""
    row = session.execute(select(WebSession, User).join(User, User.id == WebSession.user_id)
                          .where(WebSession.token_sha256 == token_sha256)).first()
    if row is None:
        return None
    web, user = row
    if now >= web.expires_at or now - web.last_seen_at >= idle:
        session.delete(web)
        return None
    # Written at most once a minute: a dashboard refreshing every few seconds does not turn
    # every read into a write.
    if now - web.last_seen_at >= dt.timedelta(minutes=1):
        web.last_seen_at = now
    return _account(user)


def end_session(session: Session, token_sha256: str) -> None:
    """Log a session out (nothing when it has ended already)."""
    session.execute(delete(WebSession).where(WebSession.token_sha256 == token_sha256))


def purge_sessions(session: Session, now: dt.datetime) -> int:
    """Delete sessions past their expiry; how many."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        delete(WebSession).where(WebSession.expires_at <= now))
    return result.rowcount or 0
