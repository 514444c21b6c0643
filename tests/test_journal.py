"""Tests for store.journal: framing, rollover, torn tails, corruption, concurrency, crashes."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.journal import (
    HEADER_SIZE,
    InvalidPosition,
    Journal,
    JournalCorrupt,
    make_position,
    split_position,
)

REPO = Path(__file__).resolve().parent.parent


def opened(directory: Path, segment_bytes: int = 64 * 1024 * 1024) -> Journal:
    journal = Journal(directory, segment_bytes=segment_bytes)
    journal.open()
    return journal


def payloads(n: int, size: int = 20) -> list[bytes]:
    return [f"{i:06d}".encode().ljust(size, b"x") for i in range(n)]


def all_payloads(journal: Journal) -> list[bytes]:
    return [p for _, _, p in journal.iter_from(journal.start_position)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.log"))


def test_position_helpers_round_trip() -> None:
    pos = make_position(7, 123456)
    assert split_position(pos) == (7, 123456)
    assert make_position(1, (1 << 40) - 1) < make_position(2, HEADER_SIZE)
    assert make_position(2**23 - 1, 2**40 - 1) < 2**63
    with pytest.raises(ValueError):
        make_position(0, 16)
    with pytest.raises(ValueError):
        make_position(1, 1 << 40)


def test_new_journal_has_one_empty_segment(tmp_path: Path) -> None:
    journal = opened(tmp_path / "journal")
    assert [p.name for p in segment_files(tmp_path / "journal")] == ["seg-000000000001.log"]
    assert journal.start_position == journal.end_position == make_position(1, HEADER_SIZE)
    assert list(journal.iter_from(journal.start_position)) == []
    assert journal.size_bytes() == HEADER_SIZE
    journal.close()
    header = (tmp_path / "journal" / "seg-000000000001.log").read_bytes()
    assert header == b"BRJ1" + bytes(4) + (1).to_bytes(8, "big")


def test_append_read_round_trip_and_positions_increase(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    data = payloads(50)
    positions = journal.append(data[:20]) + journal.append(data[20:])
    assert positions == sorted(positions) and len(set(positions)) == 50
    assert positions[0] == make_position(1, HEADER_SIZE)
    assert [journal.read(p) for p in positions] == data
    assert journal.end_position == positions[-1] + 8 + len(data[-1])
    journal.close()


def test_iter_from_start_middle_and_end(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    data = payloads(10)
    positions = journal.append(data)
    records = list(journal.iter_from(journal.start_position))
    assert [r[0] for r in records] == positions
    assert [r[1] for r in records] == [*positions[1:], journal.end_position]
    assert [r[2] for r in records] == data
    assert [p for _, _, p in journal.iter_from(positions[4])] == data[4:]
    assert list(journal.iter_from(journal.end_position)) == []
    with pytest.raises(ValueError):
        journal.iter_from(journal.end_position + 1)
    with pytest.raises(InvalidPosition):
        list(journal.iter_from(positions[3] + 2))  # not a record boundary
    journal.close()
    journal.open()  # the same object reopens after close
    assert all_payloads(journal) == data
    journal.close()


def test_rollover_and_reopen(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    data = payloads(40, size=30)  # 38-byte frames: 6 per segment
    positions = journal.append(data[:7])
    for p in data[7:]:
        positions += journal.append([p])
    journal.sync()
    files = segment_files(tmp_path)
    assert len(files) == 7
    assert all(f.stat().st_size <= 256 for f in files)
    assert [split_position(p)[0] for p in positions] == [i // 6 + 1 for i in range(40)]
    assert [journal.read(p) for p in positions] == data
    middle = positions[13]
    assert [p for _, _, p in journal.iter_from(middle)] == data[13:]
    # The end of a full segment is a valid place to resume from.
    seg_end = make_position(1, HEADER_SIZE + 6 * 38)
    assert [p for _, _, p in journal.iter_from(seg_end)] == data[6:]
    with pytest.raises(InvalidPosition):
        list(journal.iter_from(seg_end + 1))
    journal.close()
    again = opened(tmp_path, segment_bytes=256)
    assert all_payloads(again) == data
    assert again.end_position == make_position(7, HEADER_SIZE + 4 * 38)
    again.append([b"more"])
    assert all_payloads(again) == [*data, b"more"]
    again.close()


def test_large_batch_append_is_one_group(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    data = [os.urandom(1024) for _ in range(10_000)]
    positions = journal.append(data)
    journal.sync()
    assert journal.read(positions[9_999]) == data[9_999]
    assert sum(1 for _ in journal.iter_from(positions[0])) == 10_000
    journal.close()


def test_empty_and_non_bytes_payloads_rejected(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    end = journal.end_position
    with pytest.raises(ValueError):
        journal.append([b"ok", b""])
    with pytest.raises(TypeError):
        journal.append(["text"])  # type: ignore[list-item]
    assert journal.end_position == end  # validation happens before anything is written
    journal.close()


def test_read_of_a_bad_position_raises(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    [pos] = journal.append([b"hello world"])
    for bad in (pos + 3, journal.end_position, make_position(1, 0), make_position(9, 16)):
        with pytest.raises(InvalidPosition):
            journal.read(bad)
    with pytest.raises(KeyError):
        journal.read(pos + 1)
    with pytest.raises(ValueError):
        journal.read(pos + 1)
    journal.close()


def _torn_last_record(path: Path, how: str, record_at: int) -> None:
    raw = bytearray(path.read_bytes())
    if how == "mid-header":
        del raw[record_at + 5:]
    elif how == "mid-payload":
        del raw[-3:]
    elif how == "flipped-payload":
        raw[-1] ^= 0xFF
    elif how == "zero-length":
        raw[record_at:record_at + 4] = bytes(4)
    elif how == "zero-fill":
        raw += bytes(64)  # a filesystem can extend a file with zeros after a crash
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["mid-header", "mid-payload", "flipped-payload", "zero-length",
                                 "zero-fill"])
def test_torn_tail_is_truncated(tmp_path: Path, how: str) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    data = payloads(9, size=30)
    positions = journal.append(data)
    journal.close()
    last = segment_files(tmp_path)[-1]
    _torn_last_record(last, how, split_position(positions[-1])[1])
    journal = opened(tmp_path, segment_bytes=256)
    kept = data if how == "zero-fill" else data[:-1]
    assert all_payloads(journal) == kept
    assert last.stat().st_size == split_position(journal.end_position)[1]
    journal.append([b"after-repair"])
    journal.close()
    journal = opened(tmp_path, segment_bytes=256)
    assert all_payloads(journal) == [*kept, b"after-repair"]
    journal.close()


def test_torn_segment_creation_gets_a_fresh_header(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    data = payloads(6, size=30)
    journal.append(data)
    journal.close()
    (tmp_path / "seg-000000000002.log").write_bytes(b"BRJ")  # crash while writing its header
    journal = opened(tmp_path, segment_bytes=256)
    assert all_payloads(journal) == data
    assert journal.end_position == make_position(2, HEADER_SIZE)
    journal.append([b"x" * 30])
    assert all_payloads(journal) == [*data, b"x" * 30]
    journal.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_bad_record_in_earlier_segment_is_corruption(tmp_path: Path, damage: str) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    positions = journal.append(payloads(20, size=30))
    journal.close()
    first = segment_files(tmp_path)[0]
    raw = bytearray(first.read_bytes())
    offset = split_position(positions[2])[1]
    if damage == "flip":
        raw[offset + 10] ^= 0x01
    elif damage == "truncate":
        del raw[offset + 10:]
    else:
        raw[0:4] = b"XXXX"
        offset = 0
    first.write_bytes(bytes(raw))
    with pytest.raises(JournalCorrupt) as info:
        opened(tmp_path, segment_bytes=256)
    assert first.name in str(info.value)
    assert f"offset {offset}" in str(info.value)


def test_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    journal.append(payloads(20, size=30))
    journal.close()
    segment_files(tmp_path)[1].unlink()
    with pytest.raises(JournalCorrupt):
        opened(tmp_path, segment_bytes=256)


def test_record_bigger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=128)
    big = os.urandom(1000)
    positions = journal.append([b"small-1", big, b"small-2"])
    assert [split_position(p) for p in positions] == [(1, 16), (2, 16), (3, 16)]
    assert journal.read(positions[1]) == big
    journal.close()
    journal = opened(tmp_path, segment_bytes=128)
    assert all_payloads(journal) == [b"small-1", big, b"small-2"]
    journal.close()


def test_big_first_record_does_not_leave_an_empty_segment(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=128)
    [pos] = journal.append([os.urandom(500)])
    assert split_position(pos) == (1, HEADER_SIZE)
    journal.close()


def test_drop_segments_before(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    data = payloads(40, size=30)
    positions = journal.append(data)
    journal.sync()
    before = journal.size_bytes()
    assert journal.drop_segments_before(positions[0]) == 0
    # positions[14] is the third record of segment 3: segments 1 and 2 end before it.
    assert journal.drop_segments_before(positions[14]) == 2
    assert segment_files(tmp_path)[0].name == "seg-000000000003.log"
    assert journal.size_bytes() == before - 2 * (HEADER_SIZE + 6 * 38)
    assert journal.start_position == make_position(3, HEADER_SIZE)
    assert [journal.read(p) for p in positions[12:]] == data[12:]
    with pytest.raises(InvalidPosition):
        journal.read(positions[0])
    # A position inside a dropped segment resumes at the oldest remaining one.
    assert [p for _, _, p in journal.iter_from(positions[3])] == data[12:]
    # The current segment survives even when pos is past everything.
    assert journal.drop_segments_before(journal.end_position) == 4
    assert len(segment_files(tmp_path)) == 1
    assert [p for _, _, p in journal.iter_from(0)] == data[36:]
    journal.close()
    journal = opened(tmp_path, segment_bytes=256)
    assert all_payloads(journal) == data[36:]
    journal.close()


def test_reader_holding_a_dropped_segment_finishes(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=256)
    data = payloads(20, size=30)
    journal.append(data)
    stream = journal.iter_from(journal.start_position)
    first = next(stream)
    assert journal.drop_segments_before(first[1]) == 0
    journal.drop_segments_before(make_position(1, 1 << 30))
    assert next(stream)[2] == data[1]  # the open fd still reads the unlinked file
    stream.close()
    journal.close()


def test_concurrent_readers_while_writing(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=4096)
    published: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    done = threading.Event()
    errors: list[Exception] = []

    def writer() -> None:
        try:
            for i in range(300):
                batch = [f"w{i}-{k}".encode() * (1 + k) for k in range(5)]
                positions = journal.append(batch)
                if i % 10 == 0:
                    journal.sync()
                with lock:
                    published.extend(zip(positions, batch, strict=True))
        except (AssertionError, LookupError, OSError, RuntimeError, ValueError) as exc:
            # Handed over: a failure in a thread must fail the test, not vanish.
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        try:
            for _ in range(400):
                with lock:
                    snapshot = list(published)
                for pos, payload in snapshot[-50:]:
                    assert journal.read(pos) == payload
                if snapshot:
                    streamed = [(p, b) for p, _, b in journal.iter_from(snapshot[0][0])]
                    assert streamed[:len(snapshot)] == snapshot
                if done.is_set():
                    break
        except (AssertionError, LookupError, OSError, RuntimeError, ValueError) as exc:
            # Handed over: a failure in a thread must fail the test, not vanish.
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader)
                                                   for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert [b for _, _, b in journal.iter_from(0)] == [b for _, b in published]
    journal.close()


CHILD = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, {repo!r})
    from store.journal import Journal

    journal = Journal({directory!r}, segment_bytes=8192)
    journal.open()
    synced = 0
    for i in range(60):
        journal.append([b"rec-%06d" % n * 8 for n in range(i * 5, i * 5 + 5)])
        if i % 6 == 5:
            journal.sync()
            synced = (i + 1) * 5
    print(synced, flush=True)

    def more():
        for n in range(300, 200_000, 7):
            journal.append([b"rec-%06d" % k * 8 for k in range(n, n + 7)])

    threading.Thread(target=more, daemon=True).start()
    time.sleep(0.05)
    os.kill(os.getpid(), 9)
""")


def test_crash_keeps_every_synced_record(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    script = CHILD.format(repo=str(REPO), directory=str(directory))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, check=False)
    assert child.returncode == -9, child.stderr
    synced = int(child.stdout.strip())
    assert synced == 300
    journal = opened(directory, segment_bytes=8192)
    found = all_payloads(journal)
    expected = [b"rec-%06d" % n * 8 for n in range(len(found))]
    assert len(found) >= synced
    assert found == expected
    journal.append([b"after-crash"])
    journal.close()


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.binary(min_size=1, max_size=60), min_size=1, max_size=25),
       cut=st.floats(min_value=0.0, max_value=1.0))
def test_truncated_last_segment_reopens_to_a_prefix(data: list[bytes], cut: float) -> None:
    with tempfile.TemporaryDirectory() as directory:
        journal = opened(Path(directory), segment_bytes=160)
        positions = journal.append(data)
        journal.close()
        last_segment = max(split_position(p)[0] for p in positions)
        durable = sum(1 for p in positions if split_position(p)[0] < last_segment)
        last = segment_files(Path(directory))[-1]
        os.truncate(last, int(last.stat().st_size * cut))
        journal = opened(Path(directory), segment_bytes=160)
        found = all_payloads(journal)
        assert found == data[:len(found)]
        assert len(found) >= durable
        journal.append([b"again"])
        journal.close()
        journal = opened(Path(directory), segment_bytes=160)
        assert all_payloads(journal) == [*found, b"again"]
        journal.close()
