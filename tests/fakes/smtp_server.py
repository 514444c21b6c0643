"""A real SMTP server on 127.0.0.1 (aiosmtpd) that keeps every message it is sent."""
from __future__ import annotations

from aiosmtpd.controller import Controller


class Collector:
    """aiosmtpd handler that keeps every delivered envelope."""

    def __init__(self) -> None:
        self.envelopes: list = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


class EphemeralController(Controller):
    # aiosmtpd 1.4 probes `self.port` after binding, so port=0 fails unless we first learn the
    # port the OS picked (aio-libs/aiosmtpd#388).
    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()
