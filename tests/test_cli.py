"""SPEC §9 CLI: `python batchrouter.py init | check-config | create-key | usage-report` as processes."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from falcon import testing

from core import config as config_mod
from tests.harness import REPO, SEED_ENVELOPE, Api, seed_item

KEY_RE = re.compile(r"^ob_(live|test)_[0-9A-Za-z]{32,}$")
SHIPPED = REPO / "config.toml"


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without any BATCHROUTER_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHROUTER_")}
    env["BATCHROUTER_SERVER_LOG_LEVEL"] = "WARNING"
    return {**env, **extra}


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "batchrouter.py"), *args], cwd=str(cwd),
                          env=env if env is not None else clean_env(), capture_output=True, text=True,
                          timeout=60)


# --- init ---------------------------------------------------------------------------

def test_init_writes_config_data_dir_and_secret_keys(tmp_path: Path) -> None:
    env = clean_env()
    assert "BATCHROUTER_SECRET_KEYS" not in env
    done = run(tmp_path, "init", env=env)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "config.toml"
    assert written.exists()
    text = written.read_text()
    assert sum(1 for line in text.splitlines() if line.lstrip().startswith("#")) >= 5
    _, problems = config_mod.build(tomllib.loads(text), {})
    assert problems == []
    data_dir = tmp_path / "data"
    assert data_dir.is_dir()
    keys = data_dir / "secret_keys"
    assert keys.is_file()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert len(keys.read_text().strip()) >= 32
    assert (data_dir / "batchrouter.db").exists()
    # A second run changes nothing: neither the config nor the keys.
    before = (text, keys.read_text())
    again = run(tmp_path, "init", env=env)
    assert again.returncode == 0, again.stderr
    assert (written.read_text(), keys.read_text()) == before


def test_init_keeps_an_existing_config(tmp_path: Path) -> None:
    mine = "# my own config, keep me\n[server]\ndata_dir = \"./state\"\n\n[auth]\nscrypt_n = 1024\n"
    (tmp_path / "config.toml").write_text(mine)
    done = run(tmp_path, "init")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "config.toml").read_text() == mine
    assert (tmp_path / "state").is_dir()
    assert stat.S_IMODE((tmp_path / "state" / "secret_keys").stat().st_mode) == 0o600
    assert not (tmp_path / "data").exists()


def test_init_with_config_path_and_data_dir_flags(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = run(tmp_path, "init", "--config", "etc/br.toml", "--data-dir", "var/br")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "etc" / "br.toml").exists() and not (tmp_path / "config.toml").exists()
    assert (tmp_path / "var" / "br" / "secret_keys").exists()
    assert not (tmp_path / "data").exists()


def test_init_config_in_a_new_directory(tmp_path: Path) -> None:
    done = run(tmp_path, "init", "--config", "etc/br.toml")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0 and (tmp_path / "etc" / "br.toml").exists()


def test_init_with_secret_keys_from_env_writes_no_key_file(tmp_path: Path) -> None:
    done = run(tmp_path, "init", env=clean_env(BATCHROUTER_SECRET_KEYS="from-env"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data").is_dir()
    assert not (tmp_path / "data" / "secret_keys").exists()


# --- check-config -------------------------------------------------------------------

BAD_CONFIG = """
[server]
colour = "blue"

[[providers]]
name = "twin"
kind = "simulated"

[[providers]]
name = "twin"
kind = "simulated"

[[models]]
name = "gpt-5.4-mini"
  [[models.routes]]
  provider = "nowhere"
  upstream_model = "gpt-5.4-mini"
  input_per_mtok = "cheap"
  output_per_mtok = "2.00"
"""

UNSET_ENV_CONFIG = """
[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "BR_TEST_SURELY_UNSET_KEY"

[[models]]
name = "gpt-5.4-mini"
  [[models.routes]]
  provider = "openai"
  upstream_model = "gpt-5.4-mini"
  input_per_mtok = "0.25"
"""

MISSING_CREDENTIAL = """
[[providers]]
name = "secretless"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "BR_TEST_SURELY_UNSET_KEY"
"""


def _problems(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD_CONFIG)
    done = run(tmp_path, "check-config", "--config", "bad.toml")
    assert done.returncode == 1, _problems(done)
    out = _problems(done)
    assert "Traceback" not in out
    assert "colour" in out                                   # unknown key
    assert "nowhere" in out                                  # unknown provider in a route
    assert "input_per_mtok" in out and "cheap" in out        # bad price
    assert "duplicate provider name" in out and "twin" in out
    assert len([line for line in done.stdout.splitlines() if line.startswith("problem:")]) >= 4


def test_check_config_reports_an_unset_api_key_env(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(UNSET_ENV_CONFIG)
    done = run(tmp_path, "check-config", "--config", "c.toml")
    assert done.returncode == 1, _problems(done)
    assert "BR_TEST_SURELY_UNSET_KEY" in done.stdout
    ok = run(tmp_path, "check-config", "--config", "c.toml",
             env=clean_env(BR_TEST_SURELY_UNSET_KEY="sk-test"))
    assert ok.returncode == 0, _problems(ok)


def test_check_config_lists_an_unset_api_key_env_with_the_other_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD_CONFIG + MISSING_CREDENTIAL)
    done = run(tmp_path, "check-config", "--config", "bad.toml")
    assert done.returncode == 1
    assert "colour" in done.stdout and "BR_TEST_SURELY_UNSET_KEY" in done.stdout


def test_check_config_finds_what_serve_would_refuse_to_start_with(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[server]\ndatabase_url = "mysql://db/x"\n'
        '[email]\nbackend = "carrier-pigeon"\n')
    done = run(tmp_path, "check-config", "--config", "c.toml")
    assert done.returncode == 1, _problems(done)
    for word in ("database_url", "carrier-pigeon"):
        assert word in done.stdout, (word, done.stdout)
    (tmp_path / "smtp.toml").write_text(
        '[email]\nbackend = "smtp"\nhost = "mail.example.com"\npassword_env = "BR_TEST_SURELY_UNSET_PW"\n')
    done = run(tmp_path, "check-config", "--config", "smtp.toml")
    assert done.returncode == 1 and "BR_TEST_SURELY_UNSET_PW" in done.stdout, _problems(done)
    ok = run(tmp_path, "check-config", "--config", "smtp.toml", env=clean_env(BR_TEST_SURELY_UNSET_PW="pw"))
    assert ok.returncode == 0, _problems(ok)


def test_check_config_passes_on_the_shipped_file(tmp_path: Path) -> None:
    done = run(tmp_path, "check-config", "--config", str(SHIPPED))
    assert done.returncode == 0, _problems(done)
    assert "problem" not in done.stdout.replace("0 problem", "")
    assert not (tmp_path / "data").exists()                  # checking creates nothing


def test_check_config_reads_dot_config_toml_or_defaults(tmp_path: Path) -> None:
    assert run(tmp_path, "check-config").returncode == 0      # no file: built-in defaults
    (tmp_path / "config.toml").write_text("[server]\nport = \"eighty\"\n")
    done = run(tmp_path, "check-config")
    assert done.returncode == 1 and "port" in done.stdout


@pytest.mark.parametrize("content,needle", [("[server\nport = 1\n", "config.toml"),
                                            (None, "missing.toml")])
def test_check_config_unreadable_file(tmp_path: Path, content: str | None, needle: str) -> None:
    name = "config.toml" if content is not None else "missing.toml"
    if content is not None:
        (tmp_path / name).write_text(content)
    done = run(tmp_path, "check-config", "--config", name)
    assert done.returncode == 1
    assert needle in _problems(done) and "Traceback" not in done.stderr


def test_check_config_sees_the_environment(tmp_path: Path) -> None:
    done = run(tmp_path, "check-config", "--config", str(SHIPPED),
               env=clean_env(BATCHROUTER_SERVER_PORT="not-a-port"))
    assert done.returncode == 1 and "port" in done.stdout


# --- create-key ---------------------------------------------------------------------

def _runtime_api(make_runtime, data_dir: Path) -> Api:
    return Api(test_client=testing.TestClient(make_runtime(data_dir=data_dir).app))


def test_create_key_makes_a_verified_account_and_a_working_key(tmp_path: Path, make_runtime) -> None:
    data_dir = tmp_path / "data"
    api = _runtime_api(make_runtime, data_dir)     # a server already running on this data dir
    env = clean_env(BATCHROUTER_AUTH_SCRYPT_N="1024")
    done = run(tmp_path, "create-key", "--data-dir", str(data_dir), "--email", "Ops@Example.com",
               "--label", "nightly", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and KEY_RE.match(lines[0]) and lines[0].startswith("ob_live_"), done.stdout
    live = lines[0]

    status, me, _ = api.get("/v1/auth/account", token=live)
    assert status == 200, me
    assert me["account"]["email"] == "ops@example.com" and me["account"]["email_verified"] is True
    status, quote, _ = api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(1)]},
                                token=live)
    assert status == 201, quote

    # Present: the account is reused; --mode test gives a test key.
    done = run(tmp_path, "create-key", "--data-dir", str(data_dir), "--email", "ops@example.com",
               "--label", "ci", "--mode", "test", env=env)
    assert done.returncode == 0, done.stderr
    [test_key] = done.stdout.splitlines()
    assert KEY_RE.match(test_key) and test_key.startswith("ob_test_")
    status, again, _ = api.get("/v1/auth/account", token=test_key)
    assert status == 200 and again["account"]["id"] == me["account"]["id"]
    assert api.post("/v1/quotes/model", {**SEED_ENVELOPE, "items": [seed_item(1)]},
                    token=test_key)[0] == 201


def test_create_key_reuses_an_account_registered_through_the_api(tmp_path: Path, make_runtime) -> None:
    data_dir = tmp_path / "data"
    api = _runtime_api(make_runtime, data_dir)
    status, reg, _ = api.post("/v1/auth/agent-register",
                              {"agent_name": "a", "email": "ada@example.com", "password": "correct horse 1"})
    assert status == 201
    done = run(tmp_path, "create-key", "--data-dir", str(data_dir), "--email", "ADA@example.com",
               "--label", "ops", env=clean_env(BATCHROUTER_AUTH_SCRYPT_N="1024"))
    assert done.returncode == 0, done.stderr
    [key] = done.stdout.splitlines()
    _, me, _ = api.get("/v1/auth/account", token=key)
    assert me["account"]["id"] == reg["account"]["id"]
    _, listed, _ = api.get("/v1/auth/account/api-keys", token=reg["session_token"])
    assert [k["label"] for k in listed["data"]] == ["ops"]
    assert listed["data"][0]["prefix"] == key[:12]


def test_create_key_needs_email_and_label(tmp_path: Path) -> None:
    done = run(tmp_path, "create-key", "--data-dir", "d", "--email", "a@example.com")
    assert done.returncode == 2 and done.stdout == ""
    done = run(tmp_path, "create-key", "--data-dir", "d", "--email", "a@example.com", "--label", "x",
               "--mode", "prod")
    assert done.returncode == 2 and done.stdout == ""


@pytest.mark.parametrize("email,label", [("not an email", "ok"), ("ops@example.com", "x" * 65)])
def test_create_key_validates_email_and_label(tmp_path: Path, email: str, label: str) -> None:
    done = run(tmp_path, "create-key", "--data-dir", "d", "--email", email, "--label", label,
               env=clean_env(BATCHROUTER_AUTH_SCRYPT_N="1024"))
    assert done.returncode != 0 and done.stdout == ""


# --- usage-report -------------------------------------------------------------------

def test_usage_report_on_an_empty_ledger(tmp_path: Path) -> None:
    assert run(tmp_path, "init").returncode == 0
    done = run(tmp_path, "usage-report", "--month", "2026-12")
    assert done.returncode == 0, done.stderr
    assert "total_cost_usd=0.000000" in done.stdout
    assert "problem" not in done.stdout


def test_usage_report_on_a_runtime_data_dir(tmp_path: Path, make_runtime) -> None:
    data_dir = tmp_path / "data"
    make_runtime(data_dir=data_dir)
    done = run(tmp_path, "usage-report", "--month", "2026-12", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    assert "total_cost_usd=0.000000" in done.stdout


def test_usage_report_bad_month_is_a_clean_error(tmp_path: Path) -> None:
    assert run(tmp_path, "init").returncode == 0
    done = run(tmp_path, "usage-report", "--month", "2026-13")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "2026-13" in done.stderr + done.stdout


def test_usage_report_before_init_is_not_a_traceback(tmp_path: Path) -> None:
    done = run(tmp_path, "usage-report", "--month", "2026-12")
    assert "Traceback" not in done.stderr, done.stderr
