"""Bearer-token auth for the controller: `authorization: Bearer <token>` in the call's metadata.

A token is valid for every tenant, or scoped to a set of tenants (then it sees, looks up and clears
only namespaces whose description names one of them). Sources: `control.token` (all tenants; env
KVSTORE_CONTROL__TOKEN), `control.tokens_file` (lines "TOKEN [tenant,tenant...]", # comments), and,
when neither is set and `control.insecure` is off, a token generated on first start and kept in
<cache dir>/control-token (mode 0600), which the CLI reads too.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..config import KVStoreConfig, default_cache_dir
from ..errors import ConfigError, Unauthenticated


@dataclass(frozen=True)
class Principal:
    """Who is calling: `tenants` None means every tenant."""

    tenants: frozenset[str] | None

    def may_see(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


ANYONE = Principal(None)


def default_token_path() -> Path:
    return Path(default_cache_dir()) / "control-token"


def ensure_default_token() -> tuple[str, Path, bool]:
    """The embedded default's token: (token, file, created now)."""
    path = default_token_path()
    try:
        token = path.read_text().strip()
        if token:
            return token, path, False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, path, True


def read_tokens_file(path: str) -> dict[str, Principal]:
    tokens: dict[str, Principal] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"control.tokens_file: cannot read {path}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"control.tokens_file: {path}:{number}: expected 'TOKEN [tenant,tenant...]'")
        tenants = frozenset(t for t in fields[1].split(",") if t) if len(fields) == 2 else None
        tokens[fields[0]] = Principal(tenants)
    return tokens


class TokenAuth:
    """Checks a call's metadata; `insecure` lets every call through as ANYONE."""

    def __init__(self, tokens: dict[str, Principal], insecure: bool = False):
        self.tokens = dict(tokens)
        self.insecure = insecure

    @classmethod
    def from_config(cls, cfg: KVStoreConfig) -> "TokenAuth":
        control = cfg.control
        if control.insecure:
            return cls({}, insecure=True)
        tokens = read_tokens_file(control.tokens_file) if control.tokens_file else {}
        if control.token:
            tokens[control.token] = ANYONE
        if not tokens:
            token, _, _ = ensure_default_token()
            tokens[token] = ANYONE
        return cls(tokens)

    def check(self, metadata) -> Principal:
        if self.insecure:
            return ANYONE
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        for known, principal in self.tokens.items():  # constant time per candidate
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return principal
        raise Unauthenticated("unknown bearer token")
