"""CPU time of a process and of each of its threads, from ``/proc`` (Linux), for benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(stat: str) -> float:
    # the command name may hold spaces and parentheses: count the fields after its last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of a running process so far."""
    return _cpu_s(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """``{tid: (thread name, user + system CPU seconds)}`` of the process's live threads (the
    main thread's tid is ``pid``; librdkafka names its threads ``rdk:*``, RocksDB
    ``rocksdb:*``). A thread that ends while they are read is left out."""
    threads: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            threads[int(task.name)] = (name, _cpu_s((task / "stat").read_text()))
        except OSError:  # the thread ended
            continue
    return threads
