"""SPEC §9/§10 configuration: precedence, environment overrides, strictness, the shipped file."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core import config as config_mod
from core.errors import ConfigError
from tests.harness import REPO

SHIPPED = REPO / "config.toml"
PLAIN_SECTIONS = ("server", "email", "auth", "webhooks", "quotes", "artifacts", "limits")
# SPEC §10: the names (and defaults) that are the contract.
SPEC_DEFAULTS = {
    "server": {"host": "127.0.0.1", "port": 8080, "public_url": "", "data_dir": "./data",
               "database_url": ""},
    "email": {"backend": "outbox"},
    "auth": {"scrypt_n": 131072, "session_ttl_s": 86400},
    "webhooks": {"allow_hosts": [], "retry_schedule_s": [5, 300, 1800, 7200, 18000, 36000, 36000]},
    "quotes": {"ttl_s": 900, "default_max_output_tokens": 1024},
    "artifacts": {"url_ttl_s": 604800, "retention_days": 30},
    "limits": {"max_items_per_batch": 50000, "max_body_bytes": 209715200,
               "registrations_per_ip_per_hour": 20, "login_failures_per_15_min": 10,
               "monthly_spend_limit_usd": ""},
}
SMTP_KEYS = ("host", "port", "starttls", "username", "password_env", "from")
# Lists whose default gives no example of an element.
LIST_EXAMPLES = {("webhooks", "allow_hosts"): ("127.0.0.1, localhost", ["127.0.0.1", "localhost"]),
                 ("webhooks", "retry_schedule_s"): ("1,1,1", [1, 1, 1])}
SPECIAL_STRINGS = {("limits", "monthly_spend_limit_usd"): ("12.50", "12.50"),
                   ("server", "database_url"): ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
                   ("server", "log_level"): ("debug", "DEBUG"),
                   ("email", "backend"): ("smtp", "smtp")}

ALL_KEYS = [(section, key) for section, keys in config_mod.SETTINGS.items() for key in keys]


def env_name(section: str, key: str) -> str:
    return f"BATCHROUTER_{section.upper()}_{key.upper()}"


def example(section: str, key: str) -> tuple[str, object]:
    """An environment string for the key and the value it must become (never the default)."""
    if (section, key) in LIST_EXAMPLES:
        return LIST_EXAMPLES[(section, key)]
    if (section, key) in SPECIAL_STRINGS:
        return SPECIAL_STRINGS[(section, key)]
    default = config_mod.SETTINGS[section][key][1]
    if isinstance(default, bool):
        return ("false", False) if default else ("true", True)
    if isinstance(default, int):
        return str(default + 7), default + 7
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if isinstance(default, str):
        return f"{default}-custom", f"{default}-custom"
    raise AssertionError(f"no example for {section}.{key} (default {default!r}); add one")


@pytest.mark.parametrize(("section", "key", "value"), [
    ("server", "log_level", "chatty"), ("server", "database_url", "mysql://db/x"),
    ("email", "backend", "carrier-pigeon")])
def test_closed_choices_are_checked(section: str, key: str, value: str) -> None:
    _, problems = build({section: {key: value}})
    assert len(problems) == 1 and problems[0].startswith(f"{section}.{key}:"), problems


def test_smtp_needs_a_host_and_url_schemes_are_case_blind() -> None:
    _, problems = build({"email": {"backend": "smtp", "host": ""}})
    assert problems == ["email.host: required for backend 'smtp'"]
    assert build({"server": {"database_url": "SQLITE:////tmp/x.db"}})[1] == []


def build(file_data: dict | None = None, environ: dict | None = None,
          overrides: dict | None = None) -> tuple[dict, list[str]]:
    return config_mod.build(file_data or {}, environ or {}, overrides)


# --- defaults and precedence --------------------------------------------------------

def test_defaults_are_the_specs() -> None:
    config, problems = build()
    assert problems == []
    for section, keys in SPEC_DEFAULTS.items():
        for key, value in keys.items():
            assert config[section][key] == value, (section, key)
    for key in SMTP_KEYS:
        assert key in config["email"]
    assert config["sla_tiers"]["standard"] == {"window_s": 86400, "price_multiplier": "0.5"}
    assert config_mod.public_url(config) == "http://127.0.0.1:8080"


def test_every_plain_section_exists() -> None:
    assert set(PLAIN_SECTIONS) <= set(config_mod.SETTINGS)


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text('[server]\nport = 9001\nhost = "127.0.0.2"\n\n[quotes]\nttl_s = 60\n')
    env = {"BATCHROUTER_SERVER_PORT": "9002", "BATCHROUTER_SERVER_HOST": "127.0.0.3"}
    overrides = {"server": {"port": 9003}}
    config = config_mod.load(path, env, overrides)
    assert config["server"]["port"] == 9003                  # CLI
    assert config["server"]["host"] == "127.0.0.3"           # env (no CLI value)
    assert config["quotes"]["ttl_s"] == 60                   # file (no env, no CLI)
    assert config["artifacts"]["retention_days"] == 30       # default
    assert config_mod.load(path, env)["server"]["port"] == 9002
    assert config_mod.load(path, {})["server"]["port"] == 9001
    assert config_mod.load(None, {}, overrides)["server"]["port"] == 9003


def test_load_reads_dot_config_toml_when_present(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_mod.load(None, {})["server"]["port"] == 8080     # no file: defaults
    (tmp_path / "config.toml").write_text("[server]\nport = 9100\n")
    assert config_mod.load(None, {})["server"]["port"] == 9100


def test_load_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config_mod.load(tmp_path / "nope.toml", {})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        config_mod.load(broken, {})


# --- environment overrides ----------------------------------------------------------

@pytest.mark.parametrize("section,key", ALL_KEYS, ids=[f"{s}.{k}" for s, k in ALL_KEYS])
def test_every_plain_key_is_overridable_by_env(section: str, key: str) -> None:
    raw, expected = example(section, key)
    file_config, problems = build()
    assert problems == []
    assert file_config[section][key] != expected
    config, problems = build(environ={env_name(section, key): raw})
    assert problems == [], problems
    assert config[section][key] == expected
    # ...and over the file's value too.
    default = config_mod.SETTINGS[section][key][1]
    config, problems = build({section: {key: default}}, {env_name(section, key): raw})
    assert problems == [] and config[section][key] == expected


def test_env_lists_are_comma_separated() -> None:
    config, problems = build(environ={"BATCHROUTER_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1,localhost",
                                      "BATCHROUTER_WEBHOOKS_RETRY_SCHEDULE_S": "1,1,1"})
    assert problems == []
    assert config["webhooks"]["allow_hosts"] == ["127.0.0.1", "localhost"]
    assert config["webhooks"]["retry_schedule_s"] == [1, 1, 1]
    config, problems = build(environ={"BATCHROUTER_WEBHOOKS_ALLOW_HOSTS": ""})
    assert problems == [] and config["webhooks"]["allow_hosts"] == []


@pytest.mark.parametrize("name,value,where", [
    ("BATCHROUTER_SERVER_PORT", "eighty", "server.port"),
    ("BATCHROUTER_SERVER_PORT", "-1", "server.port"),
    ("BATCHROUTER_AUTH_SCRYPT_N", "0", "auth.scrypt_n"),
    ("BATCHROUTER_EMAIL_STARTTLS", "maybe", "email.starttls"),
    ("BATCHROUTER_WEBHOOKS_RETRY_SCHEDULE_S", "1,x,3", "webhooks.retry_schedule_s"),
    ("BATCHROUTER_LIMITS_MONTHLY_SPEND_LIMIT_USD", "lots", "limits.monthly_spend_limit_usd"),
    ("BATCHROUTER_LIMITS_MONTHLY_SPEND_LIMIT_USD", "-5", "limits.monthly_spend_limit_usd"),
])
def test_bad_env_value_is_a_problem_naming_the_key(tmp_path: Path, monkeypatch, name: str, value: str,
                                                   where: str) -> None:
    _, problems = build(environ={name: value})
    assert problems and any(where in p for p in problems), problems
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        config_mod.load(None, {name: value})
    assert any(where in p for p in info.value.problems)


def test_providers_and_models_are_file_only() -> None:
    config, problems = build(environ={"BATCHROUTER_PROVIDERS_NAME": "x",
                                      "BATCHROUTER_MODELS_NAME": "y",
                                      "BATCHROUTER_SLA_TIERS_STANDARD_WINDOW_S": "1"})
    assert problems == []
    assert [p["name"] for p in config["providers"]] == ["simulator"]
    assert config["sla_tiers"]["standard"]["window_s"] == 86400


# --- strictness ---------------------------------------------------------------------

def test_unknown_section_and_key_are_refused(tmp_path: Path) -> None:
    _, problems = build({"servre": {"port": 1}})
    assert any("servre" in p for p in problems)
    _, problems = build({"server": {"prot": 1}})
    assert any("prot" in p for p in problems)
    _, problems = build(overrides={"server": {"colour": "blue"}})
    assert any("colour" in p for p in problems)
    path = tmp_path / "c.toml"
    path.write_text('[servre]\nport = 1\n\n[server]\nprot = 1\nport = "x"\n')
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, {})
    text = " | ".join(info.value.problems)
    assert "servre" in text and "prot" in text and "server.port" in text   # every problem at once


def test_provider_model_and_route_problems_are_all_listed() -> None:
    data = {
        "providers": [{"name": "p", "kind": "simulated"}, {"name": "p", "kind": "teleport"},
                      {"name": "q", "kind": "openai", "bogus": 1}],
        "models": [{"name": "m", "routes": [{"provider": "nowhere", "upstream_model": "m",
                                             "input_per_mtok": "cheap"}]},
                   {"name": "n", "routes": []}],
    }
    _, problems = build(data)
    text = " | ".join(problems)
    for needle in ("duplicate provider name 'p'", "providers[1].kind", "providers[2].base_url",
                   "'bogus'", "unknown provider 'nowhere'", "input_per_mtok", "models[1].routes"):
        assert needle in text, (needle, problems)


def test_port_out_of_range_is_a_problem() -> None:
    _, problems = build({"server": {"port": 70000}})
    assert any("server.port" in p for p in problems)


# --- the shipped config.toml --------------------------------------------------------

def test_shipped_config_loads_without_problems() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    config, problems = config_mod.build(data, {})
    assert problems == []
    assert config_mod.credential_problems(config, {}) == []      # works offline, no credentials


def test_shipped_config_routes_the_seed_models_to_the_simulator() -> None:
    config = config_mod.load(SHIPPED, {})
    providers = {p["name"]: p for p in config["providers"]}
    simulator = providers["simulator"]
    assert simulator["kind"] == "simulated"
    assert simulator["region"] == "local"
    assert simulator["local"] is True and simulator["zero_data_retention"] is True
    models = {m["name"]: m for m in config["models"]}
    for name in ("gpt-5.4-mini", "gpt-5.4"):
        assert name in models
        assert "responses" in models[name]["operations"]
        assert [r["provider"] for r in models[name]["routes"]] == ["simulator"]
        assert models[name]["routes"][0]["upstream_model"] == name
    assert models["gpt-5.4-mini"]["routes"][0]["input_per_mtok"] == "0.25"
    assert models["gpt-5.4-mini"]["routes"][0]["output_per_mtok"] == "2.00"


def test_shipped_config_states_every_spec_key() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    for section, keys in SPEC_DEFAULTS.items():
        for key, value in keys.items():
            assert data[section][key] == value, (section, key)
    assert data["sla_tiers"]["standard"] == {"window_s": 86400, "price_multiplier": "0.5"}


# --- docs ---------------------------------------------------------------------------

def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [f"{section}.{key}" for section, key in ALL_KEYS
               if f"{section}.{key}" not in readme
               and not (f"[{section}]" in readme and f"{key} =" in readme)]
    assert missing == []
    missing_env = [env_name(s, k) for s, k in ALL_KEYS if env_name(s, k) not in readme]
    # The naming rule may be documented once instead of every variable.
    assert not missing_env or "BATCHROUTER_<SECTION>_<KEY>" in readme
