"""Standard Webhooks signatures: the key from a `whsec_` secret, and `v1,<base64 HMAC>`."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def secret_key(secret: str) -> bytes:
    """The text after `whsec_` as strict base64 (padding added); otherwise the whole secret."""
    if secret.startswith("whsec_"):
        text = secret[len("whsec_"):]
        try:
            decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            if decoded:
                return decoded
        except (binascii.Error, ValueError):
            pass
    return secret.encode("utf-8")


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")
