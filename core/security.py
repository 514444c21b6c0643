"""Passwords, signed tokens, API keys and sealed secrets: every secret-handling primitive."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import string
import time
from collections.abc import Callable
from typing import Any

from itsdangerous import BadData, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner

BASE62 = string.digits + string.ascii_letters
KEY_PREFIXES = {"live": "ob_live_", "test": "ob_test_"}
SCRYPT_R, SCRYPT_P = 8, 1


def new_id(prefix: str, length: int = 24) -> str:
    """A prefixed random id: one read of the OS random source, base62-encoded (~143 bits)."""
    number = int.from_bytes(os.urandom(18), "big")
    digits = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return prefix + "".join(digits)


# ---- passwords -------------------------------------------------------------------------

def hash_password(password: str, n: int) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt" or int(r) != SCRYPT_R or int(p) != SCRYPT_P:
            return False
        digest = _scrypt(password, bytes.fromhex(salt_hex), int(n))
    except ValueError:
        return False
    return hmac.compare_digest(digest, bytes.fromhex(digest_hex))


def _scrypt(password: str, salt: bytes, n: int) -> bytes:
    # n=2^17 needs 128 MiB; hashlib's default maxmem (32 MiB) would refuse it.
    maxmem = 128 * SCRYPT_R * n * 2 + 1024 * 1024
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P,
                          maxmem=maxmem, dklen=32)


# ---- API keys --------------------------------------------------------------------------

def new_api_key(mode: str) -> str:
    return KEY_PREFIXES[mode] + "".join(secrets.choice(BASE62) for _ in range(40))


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(tuple(KEY_PREFIXES.values()))


# ---- signed tokens ---------------------------------------------------------------------

class TokenInvalid(Exception):
    """Forged, altered or made for another purpose."""


class TokenExpired(TokenInvalid):
    """Genuine but older than its time to live."""


class _ClockedSigner(TimestampSigner):
    # get_timestamp() is the hook itsdangerous uses both to stamp tokens and to measure
    # max_age, so overriding it puts both under the injected clock.
    def __init__(self, *args: Any, now: Callable[[], float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._now = now

    def get_timestamp(self) -> int:
        return int(self._now())


class TokenSigner:
    """itsdangerous with SHA-256; one salt per purpose; keys listed oldest first, newest signs."""

    def __init__(self, secret_keys: list[str], purpose: str,
                 now: Callable[[], float] | None = None) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is needed")
        self._serializer = URLSafeTimedSerializer(
            list(secret_keys), salt=f"batchrouter.{purpose}", signer=_ClockedSigner,
            signer_kwargs={"digest_method": hashlib.sha256, "now": now or time.time})

    def dumps(self, payload: dict) -> str:
        return self._serializer.dumps(payload)

    def loads(self, token: str, max_age_s: float) -> Any:
        try:
            return self._serializer.loads(token, max_age=max_age_s)
        except SignatureExpired:
            raise TokenExpired("token has expired") from None
        except (BadData, UnicodeError, ValueError):
            raise TokenInvalid("token is not valid") from None


# ---- sealed secrets --------------------------------------------------------------------
# Webhook secrets and stored 202 bodies are encrypted at rest: an HMAC-SHA256 keystream
# (counter mode) with encrypt-then-MAC, keyed from the server's secret keys. Standard
# primitives only, so no extra dependency; every key verifies, the newest seals.

def _derive(secret_key: str, purpose: bytes) -> bytes:
    return hmac.new(secret_key.encode("utf-8"), b"batchrouter.seal." + purpose, hashlib.sha256).digest()


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = []
    for counter in range((length + 31) // 32):
        blocks.append(hmac.new(key, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest())
    return b"".join(blocks)[:length]


class Sealer:
    def __init__(self, secret_keys: list[str]) -> None:
        self._keys = [(_derive(k, b"enc"), _derive(k, b"mac")) for k in reversed(secret_keys)]

    def seal(self, plaintext: bytes) -> str:
        enc_key, mac_key = self._keys[0]
        nonce = os.urandom(16)
        body = bytes(a ^ b for a, b in zip(plaintext, _keystream(enc_key, nonce, len(plaintext))))
        tag = hmac.new(mac_key, nonce + body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(nonce + tag + body).decode("ascii")

    def open(self, sealed: str) -> bytes:
        raw = base64.urlsafe_b64decode(sealed.encode("ascii"))
        nonce, tag, body = raw[:16], raw[16:48], raw[48:]
        for enc_key, mac_key in self._keys:
            if hmac.compare_digest(tag, hmac.new(mac_key, nonce + body, hashlib.sha256).digest()):
                stream = _keystream(enc_key, nonce, len(body))
                return bytes(a ^ b for a, b in zip(body, stream))
        raise TokenInvalid("sealed value does not verify under any secret key")
