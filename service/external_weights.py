"""External weights: a run's adapter exported as a PEFT folder (`save_weights_external`), its
files optionally encrypted to age recipients, and downloaded through signed URLs that need no
API key.

A URL names one file of one checkpoint and an expiry, and carries an HMAC-SHA256 of both under
a secret only the server holds (a file in its storage folder, made at first start), so it
cannot be altered or extended; whoever may read the checkpoint gets URLs, and the URLs alone
open nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

from tinker_jax.errors import ValidationError

MAX_RECIPIENTS = 10
URL_TTL_SECONDS = 3600
KEY_FILE = "url_signing.key"
AGE_SUFFIX = ".age"
# The HTTP front end's route of signed downloads (no API key: the signature is the permission).
DOWNLOAD_PREFIX = "/api/v1/external_weights"


def check_recipients(recipients: Sequence[str], field: str = "age_encryption_recipients") -> list:
    """The age recipients (native `age1...` keys or SSH public keys), parsed; a ValidationError
    naming the entry for one that is not a key, or for more than MAX_RECIPIENTS."""
    import pyrage

    if len(recipients) > MAX_RECIPIENTS:
        raise ValidationError(field, f"{len(recipients)} recipients, at most {MAX_RECIPIENTS}")
    parsed = []
    for i, text in enumerate(recipients):
        if not isinstance(text, str) or len(text) > 16384:
            raise ValidationError(f"{field}[{i}]", "expected an age or SSH public key")
        kind = pyrage.x25519 if text.startswith("age1") else pyrage.ssh
        try:
            parsed.append(kind.Recipient.from_str(text.strip()))
        except pyrage.RecipientError as e:
            raise ValidationError(
                f"{field}[{i}]", f"is not an age or SSH public key: {e}"
            ) from None
    return parsed


def encrypter(recipients: Sequence[str]):
    """A function sealing one file (name, bytes) for `recipients` (already checked): its
    content encrypted to every one of them, its name with the `.age` suffix."""
    import pyrage

    parsed = check_recipients(recipients)

    def seal(name: str, data: bytes) -> tuple[str, bytes]:
        return name + AGE_SUFFIX, pyrage.encrypt(data, parsed)

    return seal


def download_paths(tinker_path: str, queries: Mapping[str, str]) -> dict[str, str]:
    """Each file's signed download URL but for its scheme and host: the HTTP front end's
    route (DOWNLOAD_PREFIX) for the file, with the query that signs it (`queries`, from
    `ServiceCore.external_weights_urls`). Both front ends put the HTTP server's address
    in front."""
    run_id, _, name = tinker_path.removeprefix("tinker://").split("/", 2)
    folder = f"{DOWNLOAD_PREFIX}/{quote(run_id, safe='')}/{quote(name, safe='')}"
    return {file: f"{folder}/{quote(file)}?{query}" for file, query in queries.items()}


def url_expiry(now: float | None = None) -> int:
    """When a download URL signed at `now` (default: the clock) stops working, in unix
    seconds: URL_TTL_SECONDS later."""
    return int((time.time() if now is None else now) + URL_TTL_SECONDS)


class UrlSigner:
    """Signs and checks download URLs with the server's secret (`storage/url_signing.key`)."""

    def __init__(self, storage: Path):
        path = storage / KEY_FILE
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        self._key = path.read_bytes()

    def signature(self, tinker_path: str, file: str, expires: int) -> str:
        message = f"{tinker_path}\n{file}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def check(self, tinker_path: str, file: str, expires: int, signature: str, now: float) -> None:
        """Refuses (ValidationError naming `signature` or `expires`) an altered or expired
        URL."""
        want = self.signature(tinker_path, file, expires)
        if not hmac.compare_digest(want, signature):
            raise ValidationError("signature", "does not match this URL")
        if now >= expires:
            raise ValidationError("expires", "this download URL has expired; ask for new URLs")
