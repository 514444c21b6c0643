"""Run every benchmark scenario of issue 7 and write the table to bench/RESULTS.md.

    python bench/run_all.py            # the issue's sizes (about 10 minutes on 2 CPUs)
    python bench/run_all.py --quick    # tiny sizes: a smoke run in well under 60 s
    python bench/run_all.py --only 2,5 --profile 10

Each scenario starts its own BatchRouter server and fake provider processes on 127.0.0.1 and
measures each figure beside a baseline in the same run. Exit status: 0 when every scenario ran
(whatever the targets say; --strict makes a missed target exit 1), 2 when a scenario crashed.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scenarios  # noqa: E402
from bench.scenarios import Outcome, Row  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ["1", "2", "5", "3", "4", "6", "7"]
HEADER = ["scenario", "figure", "baseline", "ratio", "target", "pass/fail"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(selected: list[str], sizes: dict, tmp: Path, profile_s: float) -> tuple[
        list[Row], list[str], list[str], list[tuple[str, float]], bool]:
    rows: list[Row] = []
    notes: list[str] = []
    sections: list[str] = []
    durations: list[tuple[str, float]] = []
    crashed = False
    jobs = []
    if "1" in selected:
        jobs.append(("1", lambda: scenarios.latency_bound(tmp, sizes)))
    if "2" in selected or "5" in selected or profile_s:
        only = {s for s in ("2", "5") if s in selected}
        jobs.append(("+".join(sorted(only)) or "profile",
                     lambda: scenarios.overhead_and_responsiveness(tmp, sizes, only, profile_s)))
    for name, function in (("3", scenarios.submit_latency), ("4", scenarios.bounded_memory),
                           ("6", scenarios.recovery), ("7", scenarios.fairness)):
        if name in selected:
            jobs.append((name, lambda f=function: f(tmp, sizes)))
    for name, job in jobs:
        started = time.perf_counter()
        print(f"scenario {name} ...", file=sys.stderr, flush=True)
        try:
            outcome: Outcome = job()
        except Exception as exc:
            crashed = True
            traceback.print_exc()
            outcome = Outcome([Row(f"{name}. (crashed)", f"{type(exc).__name__}: {exc}"[:200], "",
                                   None, "", False)])
        durations.append((name, time.perf_counter() - started))
        print(f"scenario {name}: {durations[-1][1]:.1f} s", file=sys.stderr, flush=True)
        rows += outcome.rows
        notes += outcome.notes
        sections += outcome.sections
    return rows, notes, sections, durations, crashed


def markdown(rows: list[Row], notes: list[str], sections: list[str],
             durations: list[tuple[str, float]], quick: bool, argv: list[str]) -> str:
    total = sum(seconds for _, seconds in durations)
    command = " ".join(["python bench/run_all.py", *argv])
    kind = "QUICK run (smoke sizes; the targets are meant for the full sizes)" if quick else "full run"
    lines = [
        "# BatchRouter benchmarks",
        "",
        f"`{command}`: {kind}, {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}. Server, fake provider (bench/fake_provider.py) "
        "and the measuring client are separate processes on 127.0.0.1; live key; items ~1 KB each.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    lines += ["", "## Notes", ""]
    lines += [f"- {note}" for note in notes]
    for section in sections:
        lines += ["", section]
    lines += ["", "## Time per scenario", "", "| scenario | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in durations]
    lines += [f"| total | {total:.0f} |", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CI smoke run")
    parser.add_argument("--only", default=",".join(ORDER),
                        help="comma-separated scenarios to run (1,2,3,4,5,6,7); default all")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="also profile the server with py-spy during a scenario-2 load")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    selected = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(selected) - set(ORDER)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    with tempfile.TemporaryDirectory(prefix="batchrouter-bench-") as tmp_name:
        rows, notes, sections, durations, crashed = run(selected, sizes, Path(tmp_name), args.profile)
    text = markdown(rows, notes, sections, durations, args.quick, sys.argv[1:])
    print(text)
    args.output.write_text(text)
    print(f"written to {args.output}", file=sys.stderr)
    if crashed:
        return 2
    if args.strict and any(row.passed is False for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
