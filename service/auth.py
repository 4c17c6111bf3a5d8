"""API keys: how they are made, stored and checked.

Keys are `tml-` (the prefix the official SDK insists on) followed by 256 random bits. The
store keeps only their hashes, so a leaked database file reveals no usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "tml-"
# How much of a key the store keeps in clear to tell keys apart (`tinker-jax keys list`): the
# `tml-` and 8 random characters, 48 of the key's 256 bits, useless for guessing the rest.
DISPLAY_PREFIX_LENGTH = 12
# Weights access tokens grant others read access to one training run's checkpoints.
WEIGHTS_TOKEN_PREFIX = "tmlw-"


def new_api_key() -> str:
    """A fresh random API key: `tml-` + 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_weights_token() -> str:
    """A fresh weights access token: `tmlw-` + 32 random bytes, stored hashed like a key."""
    return WEIGHTS_TOKEN_PREFIX + secrets.token_urlsafe(32)


def display_prefix(key: str) -> str:
    """The non-secret start of a key that `tinker-jax keys list` shows and `revoke` takes."""
    return key[:DISPLAY_PREFIX_LENGTH]


def legacy_key_id(key_hash: str) -> str:
    """What stands for a key created before prefixes were stored (only its hash is known):
    `sha256:` and the hash's first 12 hex digits, as non-secret as the prefix."""
    return "sha256:" + key_hash[:DISPLAY_PREFIX_LENGTH]


def hash_key(key: str) -> str:
    """SHA-256 of the key, as hex: the form in which keys are stored and looked up.

    A fast, unsalted hash is appropriate here (unlike for passwords): the keys carry 256 bits
    of randomness, so guessing one from its hash is hopeless however fast the hash is, and an
    unsalted hash lets the store find a key's user by an index lookup.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def keys_match(key: str, stored_hash: str) -> bool:
    """Whether `key` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_key(key), stored_hash)
