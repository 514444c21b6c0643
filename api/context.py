"""The collaborators every resource is built with; assembled once by batchrouter.py."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import peewee

from api.credentials import Authenticator
from core.mailer import Mailer
from core.security import Sealer, TokenSigner
from store.artifacts import ArtifactStore
from store.jobqueue import JobQueue


@dataclass
class Services:
    config: dict
    db: peewee.Database
    jobs: JobQueue
    artifacts: ArtifactStore
    mailer: Mailer
    auth: Authenticator
    email_tokens: TokenSigner
    sealer: Sealer
    public_url: str
    environ: Mapping[str, str]
    now: Callable[[], float]
    dummy_hash: str
    default_spend_limit_micro: int | None
    forecast: Callable[[float, int, float], Any] | None = None   # (window_s, items, deadline) -> Forecast
    wake_scheduler: Callable[[], None] = lambda: None
    wake_webhooks: Callable[[], None] = lambda: None
    is_ready: Callable[[], bool] = lambda: True
    metrics: Callable[[], dict[str, Any]] = field(default=lambda: {})
