"""Random secrets that are shown once and stored only as SHA-256 hashes.

The tokens carry 256 bits of entropy, so a fast hash is enough (no key stretching needed)
and lookups stay a single indexed equality."""

import hashlib
import secrets

PAIRING_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L


def token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def new_pairing_code() -> str:
    chars = "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def normalize_pairing_code(code: str) -> str:
    cleaned = "".join(ch for ch in code.upper() if ch.isalnum())
    return f"{cleaned[:4]}-{cleaned[4:]}"
