"""API keys: scopes, creation, and the key ring that requests are checked against.

A key reads ``sp_<key id>_<secret>``. The database holds the key id (public, used to find the key)
and the SHA-256 of the secret, never the key itself; the secret's hash is compared in constant time.
The secret is 256 random bits, so a fast hash is enough: there is nothing to stretch.

The service checks requests against an in-memory copy of the active keys (no database round trip and
no thread hand-off per request), re-read from the database every ``key_refresh_s``: keys created or
revoked by the CLI, or by another replica, take effect within that time, without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.orm import Session, sessionmaker

from sceneprint.service import repository as repo
from sceneprint.service.errors import InvalidKeyName, KeyNotFound
from sceneprint.service.schemas import SCENE_NAME_PATTERN, KeyCreated, KeyPublic
from sceneprint.service.tables import utcnow

log = logging.getLogger("sceneprint.service")

PREFIX = "sp"
KEY = re.compile(rf"{PREFIX}_(?P<key_id>[0-9a-f]{{16}})_(?P<secret>[A-Za-z0-9_-]{{43}})")


class Scope(StrEnum):
    """What a key may do; each scope includes the ones before it."""

    CLASSIFY = "classify"  # classify, and read scenes and the model
    ENROLL = "enroll"  # also enroll, add clips, delete scenes
    ADMIN = "admin"  # everything, including key management

    def allows(self, needed: Scope) -> bool:
        order = list(Scope)
        return order.index(self) >= order.index(needed)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a key's name and scope, or nobody (``name`` None) while the service is open."""

    name: str | None
    scope: Scope


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(sessions: sessionmaker[Session], *, name: str, scope: Scope) -> KeyCreated:
    """Create a key; the returned ``key`` is the only time it exists outside the client's hands."""
    if not re.fullmatch(SCENE_NAME_PATTERN, name):
        raise InvalidKeyName(f"key name {name[:80]!r} is invalid: use 1-64 characters of lowercase letters, "
                             "digits, '-' and '_'")
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    with sessions() as session:
        public = repo.add_key(session, name=name, scope=scope.value, key_id=key_id,
                              secret_sha256=secret_digest(secret))
        session.commit()
    return KeyCreated(**public.model_dump(), key=f"{PREFIX}_{key_id}_{secret}")


def list_keys(sessions: sessionmaker[Session]) -> list[KeyPublic]:
    with sessions() as session:
        return repo.keys(session)


def revoke_key(sessions: sessionmaker[Session], *, name: str) -> KeyPublic:
    """Revoke a key (idempotent); it stays listed, with the time it was revoked."""
    with sessions() as session:
        row = repo.get_key(session, name=name)
        if row is None:
            raise KeyNotFound(f"no API key is named {name[:80]!r}", key=name[:80])
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.commit()
        return repo.key_public(row)


@dataclass(frozen=True)
class _ActiveKey:
    name: str
    scope: Scope
    secret_sha256: str


class KeyRing:
    """The active keys, as last read from the database, and the key management that changes them.

    Args:
        sessions: The service's session factory.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._keys: dict[str, _ActiveKey] = {}
        self._was_open: bool | None = None  # as last logged
        self.refresh()

    @property
    def open(self) -> bool:
        """No active key exists: the service runs open."""
        return not self._keys

    def refresh(self) -> None:
        """Re-read the active keys; says so in the log when the service becomes open or closed."""
        with self._sessions() as session:
            rows = repo.active_keys(session)
        keys = {key_id: _ActiveKey(name, Scope(scope), digest) for key_id, name, scope, digest in rows}
        self._keys = keys  # replaced whole: a request in flight sees the old dict or the new one
        if self._was_open != (not keys):
            self._was_open = not keys
            if keys:
                log.info("API keys: %d active; every request but /healthz, /readyz and /docs needs one", len(keys))
            else:
                log.warning("no API key exists: the service is OPEN to every client it accepts (loopback only "
                            "unless --allow-open); create one with `sceneprint keys create`")

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid, active key; None for anything else."""
        match = KEY.fullmatch(key)
        if match is None:
            return None
        entry = self._keys.get(match["key_id"])
        # The key id is public; the secret is compared in constant time, and hashed even when the id is
        # unknown, so a wrong id and a wrong secret take the same time.
        expected = entry.secret_sha256 if entry is not None else "0" * 64
        if not hmac.compare_digest(secret_digest(match["secret"]), expected) or entry is None:
            return None
        return Principal(name=entry.name, scope=entry.scope)

    def create(self, *, name: str, scope: Scope) -> KeyCreated:
        """``create_key``, in effect at once in this process."""
        created = create_key(self._sessions, name=name, scope=scope)
        self.refresh()
        return created

    def all_keys(self) -> list[KeyPublic]:
        return list_keys(self._sessions)

    def revoke(self, *, name: str) -> KeyPublic:
        """``revoke_key``, in effect at once in this process."""
        revoked = revoke_key(self._sessions, name=name)
        self.refresh()
        return revoked
