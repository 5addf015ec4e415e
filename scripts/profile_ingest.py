"""Where the CPU goes while the consumer ingests: µs per reading, consumer and PostgreSQL.

1. `python -m scripts.bench_ingest --rounds 100` (2,000,000 readings) in the background.
2. Once its consumer has committed batches for a few seconds: py-spy samples the consumer
   (200 Hz, on-CPU, Python frames) and `perf record -a` samples the whole machine (199 Hz,
   call graphs) for the same 15 s.
3. Each process's share of the machine's CPU (perf, by command), split into parts by the
   frames its samples went through (py-spy for the consumer, PostgreSQL's own functions for
   the database), turned into µs of CPU per reading at the rate the benchmark measured.
Needs py-spy (PyPI) and perf (Debian's linux-perf), and root or perf_event_paranoid <= 0 for
perf -a. The profilers take a few % themselves. The last line is JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench"
SECONDS = 15
CORES = os.cpu_count() or 1
PY_SPY = Path(sys.executable).with_name("py-spy")  # installed beside this interpreter

# A part of the consumer: what its samples' stacks contain (the first match wins).
CONSUMER_PARTS = {
    "decode: the models' Python-level validators (timestamps)": ("models.py",),
    "decode: pydantic's JSON validation, the checks around it": ("decode.py",),
    "Kafka: aiokafka's fetch and records": ("aiokafka",),
    "write: asyncpg (arrays encoded, the call)": ("asyncpg",),
    "batching, offsets, the event loop, the rest": ("",),
}
# A part of PostgreSQL: a function its samples went through (inclusive; the first wins).
POSTGRES_PARTS = {
    "ON CONFLICT checks (history, live)": ("ExecCheckIndexConstraints",),
    "index entries (history, live)": ("ExecInsertIndexTuples",),
    "TOAST compression (mark and stream arrays)": ("toast_compress_datum",),
    "heap: history rows, live updates": ("heap_insert", "heap_update"),
    "WAL records": ("XLogInsert",),
    "float8 -> numeric": ("float8_numeric",),
    "sorting (live: newest per device)": ("tuplesort_",),
    "commit, WAL flush": ("CommitTransactionCommand",),
    "the rest: plpgsql, executor, arrays in, fence": ("",),
}


def _consumer_pid() -> int:
    while True:
        found = subprocess.run(
            ["pgrep", "-f", "consumer run"],  # noqa: S607 -- a system tool, from PATH
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.2)


def _wait_for_batches(log: Path) -> None:
    while not (log.exists() and "batch_committed" in log.read_text()):
        time.sleep(0.2)


def _consumer_shares(raw: Path) -> dict[str, float]:
    """py-spy's collapsed stacks -> each part's share of the consumer's samples."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        part = next(p for p, keys in CONSUMER_PARTS.items() if any(k in stack for k in keys))
        counts[part] += int(n)
    total = sum(counts.values())
    return {part: counts[part] / total for part in CONSUMER_PARTS}


def _samples(data: Path) -> list[tuple[str, list[str]]]:
    """perf's samples: (command, the functions on its stack, innermost first)."""
    text = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,ip,sym"],  # noqa: S607 -- from PATH
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if lines:
            frames = [line.split()[-1] for line in lines[1:] if line.split()]
            samples.append((lines[0].strip(), frames))
    return samples


def _postgres_shares(data: Path) -> tuple[float, float, dict[str, float]]:
    """(consumer's and PostgreSQL's share of the machine, each part's share of PostgreSQL).

    A sample counts for the part of the innermost function on its stack that names one (WAL
    written while inserting an index entry is WAL), so the parts do not overlap."""
    samples = _samples(data)
    commands = Counter(command for command, _ in samples)
    parts: Counter[str] = Counter()
    for command, frames in samples:
        if command != "postgres":
            continue
        part = next(
            (
                p
                for frame in frames
                for p, keys in POSTGRES_PARTS.items()
                if keys != ("",) and frame.startswith(keys)
            ),
            next(reversed(POSTGRES_PARTS)),
        )
        parts[part] += 1
    postgres = commands["postgres"]
    shares = {part: parts[part] / postgres for part in POSTGRES_PARTS}
    return commands["python"] / len(samples), postgres / len(samples), shares


def main() -> None:
    WORK.mkdir(exist_ok=True)
    log = WORK / "consumer.log"
    log.unlink(missing_ok=True)
    bench = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench_ingest", "--rounds", "100"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    pid = _consumer_pid()
    _wait_for_batches(log)
    time.sleep(3)  # past the first batches
    raw, data = WORK / "py-spy.txt", WORK / "perf.data"
    spy = subprocess.Popen(
        [
            *(str(PY_SPY), "record", "-p", str(pid), "-r", "200", "-d", str(SECONDS)),
            *("-f", "raw", "-o", str(raw), "--nonblocking"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            *("perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "199", "-o", str(data)),
            *("--", "sleep", str(SECONDS)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    spy.wait()
    out, _ = bench.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    rate = result["ingest_readings_per_s"]

    consumer_share, postgres_share, postgres_parts = _postgres_shares(data)
    consumer_parts = _consumer_shares(raw)
    # CPU seconds per second of the machine, divided by readings per second: µs a reading.
    consumer_us = consumer_share * CORES / rate * 1e6
    postgres_us = postgres_share * CORES / rate * 1e6
    print(f"ingest {rate:,} readings/s on {CORES} cores (profilers running)")
    print(f"consumer {consumer_us:.1f} µs of CPU a reading ({consumer_share:.0%} of the machine)")
    for part, share in consumer_parts.items():
        print(f"  {consumer_us * share:5.2f} µs  {share:4.0%}  {part}")
    print(f"PostgreSQL {postgres_us:.1f} µs of CPU a reading ({postgres_share:.0%} of the machine)")
    for part, share in postgres_parts.items():
        print(f"  {postgres_us * share:5.2f} µs  {share:4.0%}  {part}")
    print(
        json.dumps(
            {
                "readings_per_s": rate,
                "consumer_us_per_reading": round(consumer_us, 2),
                "postgres_us_per_reading": round(postgres_us, 2),
                "consumer": {p: round(consumer_us * s, 2) for p, s in consumer_parts.items()},
                "postgres": {p: round(postgres_us * s, 2) for p, s in postgres_parts.items()},
                "copy_ceiling_rows_per_s": result["copy_ceiling_rows_per_s"],
                "cores": CORES,
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
