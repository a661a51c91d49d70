"""Ids shaped like the real ones: `msgbatch_01…`, `msg_01…`, `toolu_01…`, `req_011C…` (base58 tails)."""

from __future__ import annotations

import hashlib
import secrets

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


# byte -> base58 character (b % 58): a translate table makes an id cost well under a microsecond.
_B58_TABLE = bytes(ord(_B58[b % 58]) for b in range(256))


def _b58(data: bytes, length: int) -> str:
    return data[:length].translate(_B58_TABLE).decode("ascii")


def new_batch_id() -> str:
    """A fresh random batch id: `msgbatch_01` + 22 base58 characters (24 after the prefix)."""
    return "msgbatch_01" + _b58(secrets.token_bytes(24), 22)


def new_request_id() -> str:
    """A fresh `request-id` header value."""
    return "req_011C" + _b58(secrets.token_bytes(24), 20)


def stable_id(prefix: str, *parts: str | bytes) -> str:
    """A deterministic id (`msg_01…`, `toolu_01…`) derived from `parts`."""
    h = hashlib.blake2b(digest_size=24)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return f"{prefix}_01" + _b58(h.digest(), 22)


def fraction(seed: int, salt: str, key: str) -> float:
    """A deterministic number in [0, 1) for (seed, salt, key): reproducible fault selection."""
    digest = hashlib.blake2b(f"{seed}\x00{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
