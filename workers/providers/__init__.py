"""Upstream providers: one Provider per configured [[providers]] entry, chosen by kind."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.config import PROVIDER_KINDS
from workers.providers.anthropic import AnthropicProvider
from workers.providers.base import Provider, ProviderCall, ProviderResult
from workers.providers.openai import OpenAIProvider
from workers.providers.simulated import SimulatedProvider

__all__ = ["PROVIDER_KINDS", "Provider", "ProviderCall", "ProviderResult", "build_provider"]


def build_provider(cfg: Mapping[str, Any], environ: Mapping[str, str]) -> Provider:
    """The provider for one validated config entry; credentials come only from `environ`."""
    kind = cfg.get("kind")
    if kind == "openai":
        return OpenAIProvider(cfg, environ)
    if kind == "anthropic":
        return AnthropicProvider(cfg, environ)
    if kind == "simulated":
        return SimulatedProvider(str(cfg["name"]), latency_ms=int(cfg.get("latency_ms") or 0),
                                 error_rate=float(cfg.get("error_rate") or 0.0),
                                 seed=int(cfg.get("seed") or 0))
    raise ValueError(f"unknown provider kind {kind!r}; expected one of {', '.join(PROVIDER_KINDS)}")
