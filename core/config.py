"""Configuration: built-in defaults < config.toml < BATCHROUTER_* environment < CLI flags."""
from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.money import parse_decimal

ENV_PREFIX = "BATCHROUTER_"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError("must be an integer")


def _nonneg_int(value: Any) -> int:
    number = _int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _positive_int(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def _port(value: Any) -> int:
    number = _int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number from 0 to 65535")
    return number


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    def convert(value: Any) -> list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ValueError("must be a list")
        return [item(v) for v in value]
    return convert


def _one_of(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _str(value)
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {text!r}")
        return text
    return convert


def _log_level(value: Any) -> str:
    return _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")(_str(value).upper())


def _database_url(value: Any) -> str:
    text = _str(value)
    if text and text.split(":", 1)[0].lower() not in ("sqlite", "postgres", "postgresql"):
        raise ValueError("must be a sqlite:///path or postgresql://user@host/db URL (or empty)")
    return text


def _decimal_or_empty(value: Any) -> str:
    text = _str(value).strip()
    if text:
        parse_decimal(text)
    return text


def _decimal(value: Any) -> str:
    text = _str(value).strip()
    parse_decimal(text)
    return text


# (converter, default) per key of each plain section; unknown keys are refused.
SETTINGS: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "server": {
        "host": (_str, "127.0.0.1"),
        "port": (_port, 8080),
        "public_url": (_str, ""),
        "data_dir": (_str, "./data"),
        "database_url": (_database_url, ""),
        "threads": (_positive_int, 8),
        "log_level": (_log_level, "INFO"),
    },
    "email": {
        "backend": (_one_of("outbox", "smtp"), "outbox"),
        "host": (_str, "localhost"),
        "port": (_positive_int, 25),
        "starttls": (_bool, False),
        "username": (_str, ""),
        "password_env": (_str, ""),
        "from": (_str, "BatchRouter <noreply@localhost>"),
    },
    "auth": {
        "scrypt_n": (_positive_int, 131072),
        "session_ttl_s": (_positive_int, 86400),
        "email_token_ttl_s": (_positive_int, 172800),
    },
    "webhooks": {
        "allow_hosts": (_list_of(_str), []),
        "retry_schedule_s": (_list_of(_nonneg_int), [5, 300, 1800, 7200, 18000, 36000, 36000]),
        "timeout_s": (_positive_int, 15),
        "max_concurrency": (_positive_int, 4),
    },
    "quotes": {
        "ttl_s": (_positive_int, 900),
        "default_max_output_tokens": (_positive_int, 1024),
    },
    "artifacts": {
        "url_ttl_s": (_positive_int, 604800),
        "retention_days": (_positive_int, 30),
    },
    "limits": {
        "max_items_per_batch": (_positive_int, 50000),
        "max_body_bytes": (_positive_int, 209715200),
        "registrations_per_ip_per_hour": (_nonneg_int, 20),
        "login_failures_per_15_min": (_nonneg_int, 10),
        "monthly_spend_limit_usd": (_decimal_or_empty, ""),
    },
    "scheduler": {
        "max_threads": (_positive_int, 128),
        "attempts_per_route": (_positive_int, 4),
        "backoff_base_s": (_float, 0.5),
        "backoff_max_s": (_float, 60.0),
        "poll_interval_s": (_float, 0.05),
    },
}

PROVIDER_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "name": (_str, None),
    "kind": (_str, None),
    "base_url": (_str, ""),
    "api_key_env": (_str, ""),
    "region": (_str, "global"),
    "zero_data_retention": (_bool, False),
    "local": (_bool, False),
    "max_concurrency": (_positive_int, 16),
    "rpm": (_nonneg_int, 0),
    "tpm": (_nonneg_int, 0),
    "timeout_s": (_positive_int, 120),
    "proxy": (_str, ""),
    "max_attempts": (_nonneg_int, 0),       # tries per route here; 0: [scheduler] attempts_per_route
    "latency_ms": (_nonneg_int, 0),
    "error_rate": (_float, 0.0),
    "seed": (_int, 0),
}
PROVIDER_KINDS = ("openai", "anthropic", "simulated")
OPERATIONS = ("responses", "chat.completions", "embeddings")
MODEL_FIELDS = {"name", "operations", "routes"}
ROUTE_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "provider": (_str, None),
    "upstream_model": (_str, None),
    "input_per_mtok": (_decimal, None),
    "output_per_mtok": (_decimal, "0"),
    # Optional cheaper prices for tiers other than priority (as providers price batch work);
    # the tier's multiplier still applies on top.
    "batch_input_per_mtok": (_decimal_or_empty, ""),
    "batch_output_per_mtok": (_decimal_or_empty, ""),
    "context_window": (_positive_int, 1_000_000),
}
TIER_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "window_s": (_positive_int, None),
    "price_multiplier": (_decimal, None),
}
DEFAULT_TIERS = {
    "priority": {"window_s": 3600, "price_multiplier": "1.0"},
    "standard": {"window_s": 86400, "price_multiplier": "0.5"},
    "economy": {"window_s": 259200, "price_multiplier": "0.4"},
}
# With no config file the service still works offline: the seed's models on the simulator.
DEFAULT_PROVIDERS = [{"name": "simulator", "kind": "simulated", "region": "local",
                      "local": True, "zero_data_retention": True, "max_concurrency": 64}]
DEFAULT_MODELS = [
    {"name": "gpt-5.4-mini", "operations": ["responses", "chat.completions"],
     "routes": [{"provider": "simulator", "upstream_model": "gpt-5.4-mini",
                 "input_per_mtok": "0.25", "output_per_mtok": "2.00"}]},
    {"name": "gpt-5.4", "operations": ["responses", "chat.completions"],
     "routes": [{"provider": "simulator", "upstream_model": "gpt-5.4",
                 "input_per_mtok": "1.25", "output_per_mtok": "10.00"}]},
    {"name": "text-embedding-3-small", "operations": ["embeddings"],
     "routes": [{"provider": "simulator", "upstream_model": "text-embedding-3-small",
                 "input_per_mtok": "0.02", "output_per_mtok": "0"}]},
]


def _convert_table(where: str, raw: Mapping[str, Any],
                   fields: Mapping[str, tuple[Callable[[Any], Any], Any]],
                   problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            problems.append(f"{where}: unknown key {key!r}")
    for key, (convert, default) in fields.items():
        if key not in raw:
            if default is None:
                problems.append(f"{where}: missing required key {key!r}")
            else:
                out[key] = copy.deepcopy(default)
            continue
        try:
            out[key] = convert(raw[key])
        except ValueError as exc:
            problems.append(f"{where}.{key}: {exc}")
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for section, keys in SETTINGS.items():
        for key in keys:
            name = f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
            if name in environ:
                found.setdefault(section, {})[key] = environ[name]
    return found


def _providers(raw: Any, problems: list[str]) -> list[dict]:
    if not isinstance(raw, list):
        problems.append("providers: must be an array of tables ([[providers]])")
        return []
    providers, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"providers[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        provider = _convert_table(where, entry, PROVIDER_FIELDS, problems)
        name = provider.get("name")
        if name in seen:
            problems.append(f"{where}: duplicate provider name {name!r}")
        seen.add(name)
        if provider.get("kind") not in PROVIDER_KINDS and "kind" in provider:
            problems.append(f"{where}.kind: must be one of {', '.join(PROVIDER_KINDS)}")
        if provider.get("kind") in ("openai", "anthropic") and not provider.get("base_url"):
            problems.append(f"{where}.base_url: required for kind {provider['kind']!r}")
        if not 0.0 <= provider.get("error_rate", 0.0) <= 1.0:
            problems.append(f"{where}.error_rate: must be between 0 and 1")
        providers.append(provider)
    return providers


def _models(raw: Any, provider_names: set[str], problems: list[str]) -> list[dict]:
    if not isinstance(raw, list):
        problems.append("models: must be an array of tables ([[models]])")
        return []
    models, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"models[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in entry:
            if key not in MODEL_FIELDS:
                problems.append(f"{where}: unknown key {key!r}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: missing required key 'name'")
        elif name in seen:
            problems.append(f"{where}: duplicate model name {name!r}")
        seen.add(name)
        operations = entry.get("operations", ["responses", "chat.completions"])
        if (not isinstance(operations, list) or not operations
                or any(op not in OPERATIONS for op in operations)):
            problems.append(f"{where}.operations: must be a non-empty list of {', '.join(OPERATIONS)}")
            operations = []
        routes = []
        for r_index, route_raw in enumerate(entry.get("routes") or []):
            r_where = f"{where}.routes[{r_index}]"
            if not isinstance(route_raw, dict):
                problems.append(f"{r_where}: must be a table")
                continue
            route = _convert_table(r_where, route_raw, ROUTE_FIELDS, problems)
            if route.get("provider") is not None and route["provider"] not in provider_names:
                problems.append(f"{r_where}.provider: unknown provider {route['provider']!r}")
            routes.append(route)
        if not routes:
            problems.append(f"{where}.routes: at least one route is required")
        models.append({"name": name, "operations": operations, "routes": routes})
    return models


def _tiers(raw: Any, problems: list[str]) -> dict[str, dict]:
    tiers = copy.deepcopy(DEFAULT_TIERS)
    if not isinstance(raw, dict):
        problems.append("sla_tiers: must be a table of tables")
        return tiers
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            problems.append(f"sla_tiers.{name}: must be a table")
            continue
        merged = {**tiers.get(name, {}), **entry}
        tiers[name] = _convert_table(f"sla_tiers.{name}", merged, TIER_FIELDS, problems)
    return tiers


def build(file_data: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
          overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict, list[str]]:
    """Merge every layer and validate; returns (config, problems) without raising."""
    file_data = dict(file_data or {})
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    config: dict[str, Any] = {}
    known = set(SETTINGS) | {"providers", "models", "sla_tiers"}
    for section in file_data:
        if section not in known:
            problems.append(f"unknown section [{section}]")
    env = _env_overrides(environ)
    for section, fields in SETTINGS.items():
        raw = file_data.get(section, {})
        if not isinstance(raw, dict):
            problems.append(f"[{section}] must be a table")
            raw = {}
        merged = {**raw, **env.get(section, {}), **(overrides or {}).get(section, {})}
        config[section] = _convert_table(section, merged, fields, problems)
    if config["email"].get("backend") == "smtp" and not config["email"].get("host"):
        problems.append("email.host: required for backend 'smtp'")
    config["providers"] = _providers(file_data.get("providers", DEFAULT_PROVIDERS), problems)
    names = {p.get("name") for p in config["providers"]}
    config["models"] = _models(file_data.get("models", DEFAULT_MODELS), names, problems)
    config["sla_tiers"] = _tiers(file_data.get("sla_tiers", {}), problems)
    return config, problems


def load(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """Read the file (or ./config.toml when present) and build; ConfigError lists every problem."""
    config, problems = build(read_file(path), environ, overrides)
    if problems:
        raise ConfigError(problems)
    return config


def read_file(path: str | os.PathLike | None) -> dict:
    if path is None:
        default = Path("config.toml")
        if not default.exists():
            return {}
        path = default
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None


def credential_problems(config: Mapping[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Secrets named by environment variable that are unset: a provider's (its routes are
    unroutable) and the SMTP password (serve refuses to start without it)."""
    problems = [f"provider {p.get('name')!r}: environment variable {p['api_key_env']} is not set"
                for p in config["providers"]
                if p.get("api_key_env") and not environ.get(p["api_key_env"])]
    email = config["email"]        # a key that failed its own check is missing here
    variable = email.get("password_env")
    if email.get("backend") == "smtp" and variable and variable not in environ:
        problems.append(f"[email] password_env names {variable}, which is not set")
    return problems


def public_url(config: Mapping[str, Any]) -> str:
    server = config["server"]
    return (server["public_url"] or f"http://{server['host']}:{server['port']}").rstrip("/")


def database_url(config: Mapping[str, Any]) -> str:
    server = config["server"]
    if server["database_url"]:
        return server["database_url"]
    return f"sqlite:///{Path(server['data_dir']).resolve() / 'batchrouter.db'}"
