"""Watch the proxy's memory and everyone's CPU while one scenario runs.

usage: procwatch.py OUT_JSON PROXY_PID UPSTREAM_PID BENCH_PGID [INTERVAL]

Reads /proc every INTERVAL seconds (0.2) until SIGTERM/SIGINT, then writes
OUT_JSON (also rewritten after every sample, atomically):

* ``rss_idle_mib``: the proxy tree's RSS at the first sample (before load);
* ``rss_peak_mib``: the highest RSS of the proxy tree seen (the sum of VmRSS
  of PROXY_PID and every descendant; pages shared by forked workers count
  once per process, so this overstates a little);
* ``cpu_s``: CPU seconds (user + system) used by, in order of precedence, the
  ``proxy`` tree, the ``upstream`` tree, the ``bench`` process group (the
  load generator, curl, this watcher), kernel threads, and ``other``
  processes (foreign load on the machine, which distorts the figures);
* ``busy_s``, ``softirq_s``: machine-wide CPU seconds from /proc/stat
  (loopback traffic costs softirq time no process is charged for);
* ``wall_s``, ``cores``, ``samples``.

A process that starts and exits between two samples is not seen.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP = (signal.SIGTERM, signal.SIGINT)


def read_stat(pid: str) -> tuple[int, int, int] | None:
    """(parent pid, process group, CPU ticks) of *pid*, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            tail = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After "pid (comm)": state ppid pgrp session tty tpgid flags minflt cminflt
    # majflt cmajflt utime stime ...
    return int(tail[1]), int(tail[2]), int(tail[11]) + int(tail[12])


def snapshot() -> dict[int, tuple[int, int, int]]:
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(name)
            if stat is not None:
                procs[int(name)] = stat
    return procs


def descendants(procs: dict[int, tuple[int, int, int]], root: int) -> set[int]:
    if root not in procs:
        return set()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _pgrp, _ticks) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, softirq) ticks of all cores together."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq + steal, softirq


class Watch:
    def __init__(self, proxy: int, upstream: int, bench_pgid: int) -> None:
        self.proxy, self.upstream, self.bench_pgid = proxy, upstream, bench_pgid
        # CPU already used before the first sample is not ours to count.
        self.start_ticks = {pid: ticks for pid, (_, _, ticks) in snapshot().items()}
        self.start_machine = machine_ticks()
        self.start_time = time.monotonic()
        self.ticks: dict[int, int] = {}
        self.role: dict[int, str] = {}
        self.rss_idle: float | None = None
        self.rss_peak = 0.0
        self.samples = 0

    def sample(self) -> None:
        procs = snapshot()
        proxy_tree = descendants(procs, self.proxy) if self.proxy else set()
        upstream_tree = descendants(procs, self.upstream) if self.upstream else set()
        for pid, (ppid, pgrp, ticks) in procs.items():
            self.ticks[pid] = ticks
            if pid in proxy_tree:
                self.role[pid] = "proxy"
            elif pid in upstream_tree:
                self.role[pid] = "upstream"
            elif pgrp == self.bench_pgid:
                self.role[pid] = "bench"
            elif pid == 2 or ppid == 2:
                self.role[pid] = "kernel"
            else:
                self.role.setdefault(pid, "other")
        rss = sum(rss_kib(pid) for pid in proxy_tree) / 1024
        if self.rss_idle is None:
            self.rss_idle = rss
        self.rss_peak = max(self.rss_peak, rss)
        self.samples += 1

    def result(self) -> dict[str, object]:
        cpu = dict.fromkeys(("proxy", "upstream", "bench", "kernel", "other"), 0)
        for pid, ticks in self.ticks.items():
            cpu[self.role[pid]] += max(0, ticks - self.start_ticks.get(pid, 0))
        busy, softirq = (b - a for a, b in zip(self.start_machine, machine_ticks(), strict=True))
        return {
            "rss_idle_mib": round(self.rss_idle or 0.0, 1),
            "rss_peak_mib": round(self.rss_peak, 1),
            "cpu_s": {k: round(v / CLOCK_TICKS, 2) for k, v in cpu.items()},
            "busy_s": round(busy / CLOCK_TICKS, 2),
            "softirq_s": round(softirq / CLOCK_TICKS, 2),
            "wall_s": round(time.monotonic() - self.start_time, 2),
            "cores": os.cpu_count(),
            "samples": self.samples,
        }


def write(path: str, data: dict[str, object]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    if len(argv) not in (5, 6):
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[1]
    proxy, upstream, bench_pgid = (int(a) for a in argv[2:5])
    interval = float(argv[5]) if len(argv) == 6 else 0.2
    watch = Watch(proxy, upstream, bench_pgid)
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    for sig in STOP:
        signal.signal(sig, stop)
    while not stopping:
        watch.sample()
        write(out, watch.result())
        deadline = time.monotonic() + interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, interval))
    watch.sample()
    write(out, watch.result())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
