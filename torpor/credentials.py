"""Credentials of the admin API: bearer tokens, the role each grants, where they live.

Owns: reading token files, creating the operator token a control plane makes when the
config names none (`admin-token` in the log folder, mode 0600), the digests a server keeps
instead of the tokens, constant-time matching, and how a client (the CLI, a standalone
activator) finds its token through the config. Must not know gRPC: the server's
interceptor (xds_server/admin_auth.py) and the client (torpor/admin_client.py) carry the
token as `authorization: Bearer TOKEN` metadata.

Who can read a token file can call the admin API with its role: a user who can read the
config's operator token file (or the one `torpor up` created) can hibernate and wake.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from torpor.config import Config
from torpor.errors import TorporError

#: gRPC metadata key of the token ("Bearer TOKEN"), as HTTP's Authorization header.
METADATA_KEY = "authorization"
#: A token in this environment variable wins over every file (a client's override).
TOKEN_ENV = "TORPOR_ADMIN_TOKEN"
#: The operator token a control plane creates in its log folder when none is configured.
CREATED_TOKEN_FILE = "admin-token"
#: Bytes of randomness in a created token (256 bits).
TOKEN_BYTES = 32


class AdminRole(enum.StrEnum):
    """What a token may do: read (status, report, WaitRouted) or also change state."""

    READ_ONLY = "read_only"
    OPERATOR = "operator"


class CredentialsError(TorporError):
    """A configured token file cannot be read or is empty."""


def created_token_path(config: Config) -> Path:
    """Where a control plane with no configured operator token keeps the one it creates."""
    return config.log_dir() / CREATED_TOKEN_FILE


def read_token(path: Path) -> str:
    """The token in `path` (surrounding whitespace stripped, as `echo TOKEN > FILE` adds a
    newline). Raises CredentialsError if it cannot be read or is empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read the admin token file {path}: {exc}") from exc
    if not token:
        raise CredentialsError(f"the admin token file {path} is empty")
    return token


def ensure_token_file(path: Path) -> str:
    """The token in `path`, created first (random, mode 0600, never overwritten) if the
    file does not exist. Concurrent creators agree: O_EXCL lets one write, the others read
    what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        restrict(path)
        for _ in range(50):  # a creator between open and write: its token comes at once
            try:
                return read_token(path)
            except CredentialsError:
                time.sleep(0.02)
        return read_token(path)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    return token


def restrict(path: Path) -> None:
    """Make a file torpor owns readable by its owner only (a token a previous version or
    a copy left readable by others)."""
    try:
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
    except OSError:
        pass


def digest(token: str) -> bytes:
    """What a server keeps of a token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclasses.dataclass(frozen=True)
class AdminTokens:
    """The digests of the tokens a server accepts, by role."""

    digests: Mapping[AdminRole, tuple[bytes, ...]]

    @classmethod
    def of(cls, operator: str | None = None, read_only: str | None = None) -> AdminTokens:
        """From tokens given as text (tests, and from_config)."""
        return cls({AdminRole.OPERATOR: (digest(operator),) if operator else (),
                    AdminRole.READ_ONLY: (digest(read_only),) if read_only else ()})

    @classmethod
    def from_config(cls, config: Config, create: bool = True) -> AdminTokens:
        """The tokens of `control_plane.admin_tokens`; without an operator file, the one in
        the log folder, created (when `create`) if missing. Raises CredentialsError."""
        files = config.control_plane.admin_tokens
        operator_file = files.operator or created_token_path(config)
        if files.operator is None and create:
            try:
                operator = ensure_token_file(operator_file)
            except OSError as exc:
                raise CredentialsError(
                    f"cannot create the admin token file {operator_file} ({exc.strerror}); "
                    "name one in control_plane.admin_tokens.operator") from exc
        else:
            operator = read_token(operator_file)
        read_only = read_token(files.read_only) if files.read_only is not None else None
        return cls.of(operator, read_only)

    def role_of(self, token: str) -> AdminRole | None:
        """The role `token` grants (operator first), or None. Compares with every digest in
        constant time, so the time taken says nothing about how close a guess was."""
        presented = digest(token)
        found: AdminRole | None = None
        for role in (AdminRole.READ_ONLY, AdminRole.OPERATOR):
            for known in self.digests.get(role, ()):
                if hmac.compare_digest(presented, known):
                    found = role
        return found


def bearer_token(metadata_value: str | None) -> str | None:
    """The token of an `authorization` value "Bearer TOKEN" (None if absent or another
    scheme)."""
    if not metadata_value:
        return None
    scheme, _, token = metadata_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclasses.dataclass(frozen=True)
class AdminTarget:
    """Where a client calls the admin API and how it finds its token: `token` if given,
    else $TORPOR_ADMIN_TOKEN, else the first readable file of `token_files`. Files are read
    at each call, so a token a control plane creates after the client started is found."""

    address: str
    token_files: tuple[Path, ...] = ()
    token: str | None = None
    # The CA of the admin API's certificate (control_plane.admin_tls.ca): call over TLS.
    ca: Path | None = None

    def __str__(self) -> str:
        return self.address

    def bearer(self) -> str | None:
        if self.token:
            return self.token
        from_env = os.environ.get(TOKEN_ENV, "").strip()
        if from_env:
            return from_env
        for path in self.token_files:
            try:
                return read_token(path)
            except CredentialsError:
                continue
        return None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.bearer()
        return ((METADATA_KEY, f"Bearer {token}"),) if token else ()

    def where(self) -> str:
        """Where the token is looked for, for a message."""
        places = [f"${TOKEN_ENV}", *(str(path) for path in self.token_files)]
        return ", ".join(places)


def admin_target(config: Config, address: str | None = None) -> AdminTarget:
    """How a client with this config reaches the admin API: `control_plane.admin_api` (or
    `address`) with the operator token file, else the read-only one, else the one a control
    plane created beside its state. Whoever can read the file gets its role."""
    files = config.control_plane.admin_tokens
    candidates = (files.operator, files.read_only,
                  None if files.operator else created_token_path(config))
    tls = config.control_plane.admin_tls
    return AdminTarget(address or str(config.control_plane.admin_api),
                       tuple(path for path in candidates if path is not None),
                       ca=tls.ca if tls is not None else None)
