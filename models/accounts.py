"""Users and API keys.

Passwords are kept only as argon2id hashes. An API key is shown once, when it
is issued; the database keeps its SHA-256 digest (a key is 32 random bytes, so
a fast digest is safe and lets a request find its key in one lookup) and a
short public prefix that names the key in listings.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models.errors import AuthenticationError, Conflict, InvalidValue, NotFound
from models.tables import ApiKey, User
from models.types import rows_changed, unstorable_text, utcnow

KEY_SCHEME = "adpa"
USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
MIN_PASSWORD_CHARS = 8
#: Longest email address and key name, as the columns allow.
MAX_EMAIL_CHARS = 255
MAX_KEY_NAME_CHARS = 255
_hasher = PasswordHasher()


@dataclass(frozen=True)
class IssuedKey:
    """A new API key: ``secret`` is the only copy of the whole key."""

    api_key_id: int
    prefix: str
    secret: str


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except Exception:  # argon2 raises several kinds for a mismatch or a bad hash
        return False


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_user(
    session: Session, username: str, email: str, password: str, *, role: str = "user"
) -> User:
    if not USERNAME.fullmatch(username):
        raise InvalidValue(
            f"username {username!r} must be 1 to 64 letters, digits, '.', '_' or '-'"
        )
    if len(email) > MAX_EMAIL_CHARS or not EMAIL.fullmatch(email):
        raise InvalidValue(f"{email[:80]!r} is not an email address")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidValue(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    user = User(
        username=username,
        email=email,
        password_hash=hash_password(password),
        role=role,
    )
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        raise Conflict(
            f"a user named {username!r} or with email {email!r} exists"
        ) from exc
    return user


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user named {username!r}")
    return user


def issue_api_key(session: Session, user: User, name: str | None = None) -> IssuedKey:
    """Create a key for a user; the returned secret is never stored."""
    if name is not None and not 0 < len(name) <= MAX_KEY_NAME_CHARS:
        raise InvalidValue(f"a key name must have 1 to {MAX_KEY_NAME_CHARS} characters")
    problem = unstorable_text(name or "")
    if problem:
        raise InvalidValue(f"the key name contains {problem}")
    prefix = secrets.token_hex(4)
    secret = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(
        user_id=user.user_id, prefix=prefix, key_digest=_digest(secret), name=name
    )
    session.add(row)
    session.flush()
    return IssuedKey(row.api_key_id, prefix, secret)


def revoke_api_key(session: Session, prefix: str) -> None:
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if rows_changed(result) != 1:
        raise NotFound(f"no active API key with prefix {prefix!r}")


def authenticate(session: Session, key: str) -> User:
    """The user an API key belongs to; unknown, malformed or revoked keys fail."""
    malformed = "malformed API key: expected adpa_<prefix>_<secret>"
    if not isinstance(key, str) or unstorable_text(key):
        raise AuthenticationError(malformed)
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        raise AuthenticationError(malformed)
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    if row is None or not hmac.compare_digest(row.key_digest, _digest(key)):
        raise AuthenticationError(
            f"invalid API key {parts[1]}: unknown or wrong secret"
        )
    if row.revoked_at is not None:
        raise AuthenticationError(
            f"API key {parts[1]} was revoked at {row.revoked_at:%Y-%m-%d %H:%M} UTC"
        )
    return row.user


def list_api_keys(session: Session, user: User) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.user_id == user.user_id)
            .order_by(ApiKey.api_key_id)
        )
    )
