"""Fixtures: a real Runtime on a temporary SQLite file, its falcon client, a clock, fakes."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from falcon import testing

import batchrouter
from core import config as config_mod
from tests.fakes.openai_server import FakeOpenAIServer
from tests.harness import FAST_AUTH, Api

SECRET_ENV = {"BATCHROUTER_SECRET_KEYS": "test-secret-key"}


class Clock:
    """Injected time: starts at the real now, moves only when a test says so."""

    def __init__(self, start: float | None = None) -> None:
        import time
        self.value = time.time() if start is None else start

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


def build_config(data_dir: Path, file_data: dict | None = None, **sections: dict) -> dict:
    data = dict(file_data or {})
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    data.setdefault("auth", {}).update({k: v for k, v in FAST_AUTH.items()
                                        if k not in data.get("auth", {})})
    data.setdefault("server", {})["data_dir"] = str(data_dir)
    config, problems = config_mod.build(data, {})
    assert not problems, problems
    return config


@pytest.fixture
def make_runtime(tmp_path: Path) -> Iterator:
    """make_runtime(file_data=None, environ=None, now=None, start=True, **sections) -> Runtime."""
    made = []

    def make(file_data: dict | None = None, environ: dict | None = None, now=None,
             start: bool = True, data_dir: Path | None = None, **sections: dict):
        config = build_config(data_dir or tmp_path / "data", file_data, **sections)
        kwargs = {"now": now} if now is not None else {}
        runtime = batchrouter.Runtime(config, {**SECRET_ENV, **(environ or {})}, **kwargs)
        if start:
            runtime.start()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.stop()


@pytest.fixture
def runtime(make_runtime):
    return make_runtime()


@pytest.fixture
def api(runtime) -> Api:
    return Api(test_client=testing.TestClient(runtime.app))


@pytest.fixture
def outbox(runtime) -> Path:
    return Path(runtime.config["server"]["data_dir"]) / "outbox"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server
