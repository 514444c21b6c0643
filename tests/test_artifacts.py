"""Tests for store.artifacts: atomic files, signed URLs, ETags and byte ranges."""
from __future__ import annotations

import hashlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer

from store.artifacts import (
    ArtifactStore,
    ArtifactTokenError,
    ArtifactTokenExpired,
    ArtifactTokenInvalid,
    RangeNotSatisfiable,
    parse_range,
)

T0 = 1_700_000_000.0
LINES = [b'{"custom_id":"a","n":1}\n', b'{"custom_id":"b","n":2}\n']


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_store(root, keys=("k-old-0123456789",), ttl=3600, clock=None) -> ArtifactStore:
    return ArtifactStore(root, list(keys), url_ttl_s=ttl, public_url="https://br.example/",
                         now=clock or Clock())


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return make_store(tmp_path / "artifacts")


def _token(url: str) -> str:
    prefix = "https://br.example/v1/artifacts/"
    assert url.startswith(prefix)
    return url[len(prefix):]


# --- files --------------------------------------------------------------------------

def test_write_and_read_back(store):
    n = store.write("bat_1", "results.jsonl", iter(LINES))
    path = store.path("bat_1", "results.jsonl")
    assert n == sum(map(len, LINES)) == path.stat().st_size
    assert path.read_bytes() == b"".join(LINES)
    assert store.exists("bat_1", "results.jsonl")
    assert not store.exists("bat_1", "errors.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["results.jsonl"]  # no tmp left


def test_write_empty_artifact(store):
    assert store.write("bat_1", "errors.jsonl", []) == 0
    assert store.path("bat_1", "errors.jsonl").read_bytes() == b""


def test_failing_iterator_leaves_nothing(store):
    def lines():
        yield LINES[0]
        raise RuntimeError("provider exploded")

    with pytest.raises(RuntimeError):
        store.write("bat_1", "results.jsonl", lines())
    assert not store.exists("bat_1", "results.jsonl")
    assert list(store.path("bat_1", "results.jsonl").parent.iterdir()) == []


def test_failed_rewrite_keeps_previous_version(store):
    store.write("bat_1", "results.jsonl", LINES)

    def lines():
        yield b"partial\n"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.write("bat_1", "results.jsonl", lines())
    assert store.path("bat_1", "results.jsonl").read_bytes() == b"".join(LINES)


@pytest.mark.parametrize("batch_id, name", [
    ("../etc", "results.jsonl"),
    ("bat_1/../../x", "results.jsonl"),
    ("bat_", "results.jsonl"),
    ("bat_1\n", "results.jsonl"),
    ("BAT_1", "results.jsonl"),
    ("bat_1", "../results.jsonl"),
    ("bat_1", "passwd"),
    ("bat_1", ""),
    (None, "results.jsonl"),
])
def test_path_rejects_bad_addresses(store, batch_id, name):
    with pytest.raises(ValueError):
        store.path(batch_id, name)
    with pytest.raises(ValueError):
        store.sign_url(batch_id, name)


def test_delete_batch_and_missing_is_fine(store):
    store.write("bat_1", "results.jsonl", LINES)
    store.delete_batch("bat_1")
    assert not store.path("bat_1", "results.jsonl").parent.exists()
    store.delete_batch("bat_1")
    store.delete_batch("bat_neverexisted")


def test_etag_is_quoted_and_changes_on_rewrite(store):
    store.write("bat_1", "results.jsonl", LINES)
    first = store.etag("bat_1", "results.jsonl")
    assert first.startswith('"') and first.endswith('"')
    assert store.etag("bat_1", "results.jsonl") == first
    store.write("bat_1", "results.jsonl", LINES)  # same bytes, new file
    assert store.etag("bat_1", "results.jsonl") != first


# --- signed URLs --------------------------------------------------------------------

def test_sign_verify_round_trip(store):
    url = store.sign_url("bat_abc123", "errors.jsonl")
    assert store.verify_token(_token(url)) == ("bat_abc123", "errors.jsonl")


def test_altered_token_is_invalid(store):
    token = _token(store.sign_url("bat_1", "results.jsonl"))
    flipped = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    for bad in (flipped, token + "x", token[:-1], "", "not-a-token", "a.b.c"):
        with pytest.raises(ArtifactTokenInvalid):
            store.verify_token(bad)


def test_token_from_another_key_is_invalid(tmp_path, store):
    other = make_store(tmp_path / "other", keys=["some-other-key-xyz"])
    with pytest.raises(ArtifactTokenInvalid):
        store.verify_token(_token(other.sign_url("bat_1", "results.jsonl")))


def test_token_with_foreign_payload_is_invalid(tmp_path):
    # Correctly signed with our key and salt, but not an artifact address. The forger
    # stamps with the real clock, so the store must read it too.
    store = make_store(tmp_path, clock=time.time)
    forger = URLSafeTimedSerializer(["k-old-0123456789"], salt="batchrouter.artifact",
                                    signer_kwargs={"digest_method": hashlib.sha256})
    for payload in ({"b": "../x", "f": "results.jsonl"}, {"b": "bat_1"}, ["bat_1"], 7,
                    {"b": "bat_1", "f": "results.jsonl", "extra": 1}):
        with pytest.raises(ArtifactTokenInvalid):
            store.verify_token(forger.dumps(payload))


def test_key_rotation(tmp_path):
    clock = Clock()
    old = make_store(tmp_path, keys=["key-2024"], clock=clock)
    rotated = make_store(tmp_path, keys=["key-2024", "key-2025"], clock=clock)
    new_only = make_store(tmp_path, keys=["key-2025"], clock=clock)
    old_token = _token(old.sign_url("bat_1", "results.jsonl"))
    assert rotated.verify_token(old_token) == ("bat_1", "results.jsonl")
    with pytest.raises(ArtifactTokenInvalid):
        new_only.verify_token(old_token)
    # Signing uses the newest key: a store holding only that key accepts the token.
    new_token = _token(rotated.sign_url("bat_1", "results.jsonl"))
    assert new_only.verify_token(new_token) == ("bat_1", "results.jsonl")
    with pytest.raises(ArtifactTokenInvalid):
        old.verify_token(new_token)


def test_expiry_uses_injected_clock(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, ttl=600, clock=clock)
    token = _token(store.sign_url("bat_1", "results.jsonl"))
    clock.t = T0 + 600
    assert store.verify_token(token) == ("bat_1", "results.jsonl")
    clock.t = T0 + 601
    with pytest.raises(ArtifactTokenExpired):
        store.verify_token(token)


def test_token_errors_share_a_base():
    assert issubclass(ArtifactTokenInvalid, ArtifactTokenError)
    assert issubclass(ArtifactTokenExpired, ArtifactTokenError)


def test_store_needs_a_key(tmp_path):
    with pytest.raises(ValueError):
        make_store(tmp_path, keys=[])


@given(st.text(max_size=200))
def test_garbage_tokens_are_invalid_never_crash(garbage):
    store = make_store("/nonexistent")
    with pytest.raises(ArtifactTokenInvalid):
        store.verify_token(garbage)


# --- Range --------------------------------------------------------------------------

@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-0", (0, 0)),
    ("bytes=0-99", (0, 99)),
    ("bytes=10-19", (10, 19)),
    ("bytes=90-500", (90, 99)),  # end clamped to size
    ("bytes=50-", (50, 99)),  # open-ended
    ("bytes=-10", (90, 99)),  # suffix
    ("bytes=-1000", (0, 99)),  # suffix longer than the file
    ("Bytes=5-6", (5, 6)),  # range units are case-insensitive
    (" bytes=5-6 ", (5, 6)),
    ("bytes=0-" + "9" * 5000, (0, 99)),
])
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", [
    "bytes=100-",  # starts at size
    "bytes=200-300",  # beyond size
    "bytes=" + "9" * 5000 + "-",
    "bytes=-0",  # empty suffix
    "bytes=5-4",  # end before start
    "bytes=-",
    "bytes=",
    "bytes 0-1",
    "items=0-1",
    "bytes=a-b",
    "bytes=1-2-3",
    "bytes=0-1,5-6",  # multiple ranges
    "bytes=0-1, 5-6",
    "",
])
def test_parse_range_unsatisfiable(header):
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, 100)
    assert info.value.size == 100


def test_parse_range_empty_file():
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


@given(size=st.integers(1, 10_000), a=st.integers(0, 20_000), b=st.integers(0, 20_000))
def test_parse_range_result_always_inside_file(size, a, b):
    for header in (f"bytes={a}-{b}", f"bytes={a}-", f"bytes=-{b}"):
        try:
            start, end = parse_range(header, size)
        except RangeNotSatisfiable:
            continue
        assert 0 <= start <= end < size
