"""Summarise a py-spy `--format raw` profile: where the samples go, by thread role and function.

    py-spy record --gil -r 200 -d 10 --format raw -o /tmp/server.txt --pid <server pid>
    python bench/profile_summary.py /tmp/server.txt [--top 25]

`--gil` records only the thread holding the GIL, so for a GIL-bound server the shares are
shares of the time the interpreter spends.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
ROLES = (("Committer._loop", "committer (journal + SQLite apply)"),
         ("Scheduler._work_loop", "dispatch workers"),
         ("Scheduler._loop", "scheduler loop (claim, housekeeping)"),
         ("WebhookSender", "webhooks"),
         ("waitress", "API (waitress)"))


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    file = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{file}:{match.group('func')}"


def role(frames: list[str]) -> str:
    joined = ";".join(frames)
    for marker, name in ROLES:
        if marker in joined:
            return name
    return "other"


IDLE_LEAVES = ("Condition.wait", "Event.wait", "Queue.get", "wasyncore.py:poll", "time.sleep",
               "Thread.join", "SocketIO.readinto", "select")


def summarise(path: Path, top: int = 25, match: str = "", drop_idle: bool = False) -> str:
    """Shares of the samples; `match` keeps only stacks containing it, `drop_idle` drops stacks
    whose innermost frame is a wait (for profiles taken without --gil)."""
    stacks = [(frames, count) for frames, count in parse(path)
              if match in ";".join(frames)
              and not (drop_idle and any(leaf in short(frames[-1]) or leaf in frames[-1]
                                         for leaf in IDLE_LEAVES))]
    total = sum(count for _, count in stacks) or 1
    roles: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        roles[role(frames)] += count
        self_time[short(frames[-1])] += count
        for name in {short(f) for f in frames}:
            inclusive[name] += count
    out = [f"{total} samples in {path}", "", "| thread role | share |", "|---|---|"]
    out += [f"| {name} | {count / total:.1%} |" for name, count in roles.most_common()]
    out += ["", "| function (inclusive) | share |", "|---|---|"]
    skip = ("threading.py:", "<module>", "Thread.run")
    shown = [(n, c) for n, c in inclusive.most_common() if not n.startswith(skip)][:top]
    out += [f"| {name} | {count / total:.1%} |" for name, count in shown]
    out += ["", "| function (self) | share |", "|---|---|"]
    out += [f"| {name} | {count / total:.1%} |" for name, count in self_time.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="keep only stacks containing this text")
    parser.add_argument("--drop-idle", action="store_true", help="drop stacks that end in a wait")
    args = parser.parse_args()
    print(summarise(args.path, args.top, args.match, args.drop_idle))


if __name__ == "__main__":
    main()
