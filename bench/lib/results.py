"""Record benchmark rows and print them as markdown.

usage:
  results.py wrk   ROWS CONFIG SCENARIO WRK_OUTPUT WATCH_JSON [--expect-status 401] [--conns SPLIT]
  results.py curl  ROWS CONFIG SCENARIO CURL_OUTPUT WATCH_JSON --size BYTES
  results.py check ROWS CONFIG ERRORS NOTE
  results.py report ROWS [--peers HARNESS_TSV...]

ROWS is a JSON-lines file, one object per measured row (see ``_row``; the
round comes from $BENCH_ROUND). ``report`` prints the table of this run (the
median of each figure over the rounds), the identity on/off difference and,
with ``--peers`` (one TSV per run of the shared harness), authproxy's figures
against the peers measured in the same invocation, with the issue's targets.
Ratios between candidates are taken within each harness run, then the median
over the runs: the machine drifts between runs more than within one.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

#: Figures merged over rounds, and the decimals their medians keep.
DIGITS = {"value": 1, "p50_ms": 2, "p99_ms": 2, "cpu_proxy_s": 2, "cpu_us_per_req": 0, "ttfb_s": 4}
NOISY_SHARE = 0.05  # foreign processes used more than this share of the machine
UNITS = {"small": "req/s", "1m": "MB/s", "big": "MB/s"}
LABELS = {
    "forwarder": "(a) forwarder only",
    "pipeline": "(b) full pipeline, identity verifying",
    "refusing": "(c) full pipeline, identity refusing",
    "noidentity": "(d) full pipeline without identity",
    "baseline": "(b) at BASELINE_VENV's commit",
    "gevent": "(b) under the gevent worker",
}


def _row(config: str, scenario: str, **fields: Any) -> dict[str, Any]:
    base = dict.fromkeys(
        (
            "value",
            "p50_ms",
            "p99_ms",
            "rss_idle_mib",
            "rss_peak_mib",
            "cpu_proxy_s",
            "cpu_us_per_req",
            "requests",
            "ttfb_s",
        )
    )
    base.update(
        config=config,
        scenario=scenario,
        unit=UNITS.get(scenario, ""),
        errors=0,
        flags=[],
        note="",
        round=int(os.environ.get("BENCH_ROUND", "1")),
    )
    base.update(fields)
    return base


def _watch_fields(path: str) -> dict[str, Any]:
    try:
        watch = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"flags": ["NO-SAMPLES"]}
    cpu = watch["cpu_s"]
    flags = []
    if cpu["other"] > NOISY_SHARE * watch["wall_s"] * (watch["cores"] or 1):
        flags.append(f"NOISY(other={cpu['other']}s)")
    return {
        "rss_idle_mib": watch["rss_idle_mib"],
        "rss_peak_mib": watch["rss_peak_mib"],
        "cpu_proxy_s": cpu["proxy"],
        "flags": flags,
        "cpu": cpu,
        "softirq_s": watch["softirq_s"],
        "wall_s": watch["wall_s"],
    }


def _append(rows_path: str, row: dict[str, Any]) -> None:
    with open(rows_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if row["scenario"] == "check":
        state = "ok" if not row["errors"] else f"FAILED ({row['errors']})"
        print(f"  {row['config']:<22} check  {state}: {row['note']}", flush=True)
        return
    value = "-" if row["value"] is None else row["value"]
    print(
        f"  {row['config']:<22} {row['scenario']:<6} {value:>10} {row['unit']:<6}"
        f" p50={row['p50_ms']} p99={row['p99_ms']} rss={row['rss_peak_mib']}"
        f" errors={row['errors']} {' '.join(row['flags'])}",
        flush=True,
    )


def record_wrk(args: argparse.Namespace) -> None:
    text = Path(args.output).read_text(errors="replace")
    found = re.search(r"^BENCH_WRK (\{.*\})$", text, re.M)
    watch = _watch_fields(args.watch)
    if not found:
        _append(
            args.rows,
            _row(
                args.config, args.scenario, errors=1, note=f"wrk failed: {text[-300:]!r}", **watch
            ),
        )
        return
    w = json.loads(found.group(1))
    seconds = w["duration_us"] / 1e6
    socket_errors = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    if args.expect_status:
        # wrk counts every response outside 2xx/3xx; all of them should be that status.
        wrong = w["requests"] - w["non_2xx_3xx"]
        note = f"expected {args.expect_status}: {w['non_2xx_3xx']} of {w['requests']} were non-2xx"
    else:
        wrong, note = w["non_2xx_3xx"], ""
    if args.scenario == "small":
        value = round(w["requests"] / seconds)
    else:  # MB/s, MB = 10^6 bytes, headers included (as the harness counts)
        value = round(w["bytes"] / w["duration_us"], 1)
    row = _row(
        args.config,
        args.scenario,
        value=value,
        p50_ms=round(w["p50_us"] / 1000, 2),
        p99_ms=round(w["p99_us"] / 1000, 2),
        requests=w["requests"],
        errors=socket_errors + wrong,
        note=note,
        connections=args.connections,
        **watch,
    )
    if row.get("cpu_proxy_s") is not None and w["requests"]:
        row["cpu_us_per_req"] = round(row["cpu_proxy_s"] / w["requests"] * 1e6)
    if args.conns:
        row["conns_per_proc"] = args.conns
        counts = [int(c) for c in args.conns.split("/") if c.isdigit()]
        if len(counts) >= 1 and sum(counts) >= 4 and counts[0] > 0.8 * sum(counts):
            if args.processes and args.processes > 1:
                row["flags"].append(f"UNBALANCED({args.conns})")
    _append(args.rows, row)


def record_curl(args: argparse.Namespace) -> None:
    speeds, ttfbs, errors, notes = [], [], 0, []
    for line in Path(args.output).read_text().splitlines():
        parts = line.split()
        if len(parts) != 4:
            errors += 1
            notes.append(line[:80])
            continue
        code, size, total, ttfb = parts
        if code == "200" and int(size) == args.size and float(total) > 0:
            speeds.append(int(size) / float(total) / 1e6)
            ttfbs.append(float(ttfb))
        else:
            errors += 1
            notes.append(f"http={code} bytes={size}")
    watch = _watch_fields(args.watch)
    row = _row(args.config, args.scenario, errors=errors, note="; ".join(notes), **watch)
    if speeds:
        row["value"] = round(statistics.median(speeds), 1)
        row["ttfb_s"] = round(statistics.median(ttfbs), 4)
        if len(speeds) > 1:
            row["note"] = f"MB/s of each try: {[round(s) for s in speeds]}"
    _append(args.rows, row)


def record_check(args: argparse.Namespace) -> None:
    _append(args.rows, _row(args.config, "check", errors=int(args.errors), note=args.note))


# ---------------------------------------------------------------- report


def load_rows(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _median(values: list[Any], digits: int = 2) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    middle = statistics.median(present)
    if not isinstance(middle, float):
        return middle
    return round(middle, digits) if digits else round(middle)


def merge_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration and scenario: the median of each figure over the
    rounds (the lowest idle and the highest peak RSS), errors and remarks of all."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["scenario"]), []).append(r)
    merged = []
    for (_config, scenario), group in groups.items():
        row = dict(group[0])
        row["errors"] = sum(int(r["errors"] or 0) for r in group)
        row["flags"] = list(dict.fromkeys(f for r in group for f in r["flags"]))
        row["note"] = "; ".join(dict.fromkeys(r["note"] for r in group if r["note"]))
        row["rounds"] = len(group)
        if scenario != "check":
            for key, digits in DIGITS.items():
                row[key] = _median([r[key] for r in group], digits)
            idle = [r["rss_idle_mib"] for r in group if r["rss_idle_mib"] is not None]
            peak = [r["rss_peak_mib"] for r in group if r["rss_peak_mib"] is not None]
            row["rss_idle_mib"] = min(idle) if idle else None
            row["rss_peak_mib"] = max(peak) if peak else None
            row["values"] = [r["value"] for r in group]
        merged.append(row)
    return merged


def own_table(rows: list[dict[str, Any]]) -> list[str]:
    rows = merge_rounds(rows)
    out = [
        "| configuration | scenario | req/s or MB/s | p50 ms | p99 ms | peak RSS MiB (idle) "
        "| proxy CPU s (µs/req) | errors | remarks |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if r["scenario"] == "check":
            if r["errors"]:
                out.append(
                    f"| {_label(r['config'])} | check | | | | | | {r['errors']} | {r['note']} |"
                )
            continue
        value = f"{_fmt(r['value'], r['scenario'])} {r['unit']}" if r["value"] is not None else "-"
        rss = (
            f"{_cell(r['rss_peak_mib'])} ({_cell(r['rss_idle_mib'])})"
            if r["rss_peak_mib"] is not None
            else "-"
        )
        remarks = list(r["flags"])
        if len(r["values"]) > 1:
            remarks.insert(0, "rounds: " + " / ".join(_cell(v) for v in r["values"]))
        if r["ttfb_s"] is not None:
            remarks.insert(0, f"ttfb {r['ttfb_s']} s")
        if r["note"]:
            remarks.append(r["note"])
        out.append(
            f"| {_label(r['config'])} | {r['scenario']} | {value} | {_cell(r['p50_ms'])} "
            f"| {_cell(r['p99_ms'])} | {rss} | {_cpu(r)} "
            f"| {r['errors']} | {'; '.join(remarks)} |"
        )
    return out


def _cpu(row: dict[str, Any]) -> str:
    if row["cpu_proxy_s"] is None:
        return "-"
    if row["cpu_us_per_req"] is None:
        return str(row["cpu_proxy_s"])
    return f"{row['cpu_proxy_s']} ({row['cpu_us_per_req']})"


def _label(config: str) -> str:
    return LABELS.get(config, config)


def _find(rows: list[dict[str, Any]], config: str, scenario: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["config"] == config and r["scenario"] == scenario), None)


def identity_costs(rows: list[dict[str, Any]], scenario: str) -> list[float]:
    """(d) against (b) in each round, in %: positive = identity costs throughput."""
    costs = []
    for on in rows:
        if on["config"] != "pipeline" or on["scenario"] != scenario or not on["value"]:
            continue
        off = next(
            (
                r
                for r in rows
                if r["config"] == "noidentity"
                and r["scenario"] == scenario
                and r.get("round", 1) == on.get("round", 1)
            ),
            None,
        )
        if off and off["value"]:
            costs.append((off["value"] - on["value"]) / off["value"] * 100)
    return costs


def identity_difference(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    merged = merge_rounds(rows)
    for scenario in UNITS:
        on, off = _find(merged, "pipeline", scenario), _find(merged, "noidentity", scenario)
        costs = identity_costs(rows, scenario)
        if on and off and costs:
            each = " / ".join(f"{c:+.1f}" for c in costs)
            out.append(
                f"| {scenario} | {on['value']} | {off['value']} "
                f"| {statistics.median(costs):+.1f} % | {each} |"
            )
    if not out:
        return []
    return [
        "",
        "Identity on vs off (positive = identity costs throughput; the cost is taken "
        "within each round, where (b) and (d) run back to back, then the median):",
        "",
        "| scenario | (b) identity on | (d) identity off | cost (median) | cost per round, % |",
        "|---|--:|--:|--:|---|",
        *out,
    ]


def load_peers(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _num(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def peers_tables(runs: list[list[dict[str, str]]], rows: list[dict[str, Any]]) -> list[str]:
    """*runs*: the rows of each run of the peers' harness."""

    def cells(candidate: str, scenario: str) -> list[dict[str, str] | None]:
        return [
            next(
                (p for p in run if p["candidate"] == candidate and p["scenario"] == scenario), None
            )
            for run in runs
        ]

    def each(candidate: str, scenario: str, column: str = "rps_or_MBps") -> list[float | None]:
        return [None if c is None else _num(c[column]) for c in cells(candidate, scenario)]

    def get(candidate: str, scenario: str, column: str = "rps_or_MBps") -> float | None:
        return _median(each(candidate, scenario, column))

    def frac(
        candidate: str, other: str, scenario: str, column: str = "rps_or_MBps"
    ) -> float | None:
        """candidate / other within each run, then the median over the runs."""
        pairs = zip(each(candidate, scenario, column), each(other, scenario, column), strict=True)
        ratios = [a / b for a, b in pairs if a is not None and b]
        return statistics.median(ratios) if ratios else None

    def ratio(candidate: str, other: str, scenario: str, column: str = "rps_or_MBps") -> str:
        found = frac(candidate, other, scenario, column)
        return "-" if found is None else f"{found:.2f}"

    def note(candidate: str, scenario: str, key: str) -> list[float | None]:
        found = []
        for c in cells(candidate, scenario):
            match = c and re.search(rf"(?:^|[\s,:]){re.escape(key)}=([0-9.]+)", c["note"])
            found.append(_num(match.group(1)) if match else None)
        return found

    def cpu_per_request(candidate: str) -> str:
        per = [
            cpu / requests * 1e6
            for cpu, requests in zip(
                note(candidate, "small", "proxy"), note(candidate, "small", "requests"), strict=True
            )
            if cpu is not None and requests
        ]
        return f"{statistics.median(per):.0f}" if per else "-"

    def flags(candidate: str, scenario: str) -> str:
        notes = " ".join(c["note"] for c in cells(candidate, scenario) if c)
        return " ".join(f for f in ("NOISY", "UNBALANCED") if f in notes)

    candidates = list(dict.fromkeys(p["candidate"] for run in runs for p in run))
    where = "same invocation" if len(runs) == 1 else f"same invocation, median of {len(runs)} runs"
    out = [
        "",
        f"All candidates of the peers' harness ({where}):",
        "",
        "| candidate | small req/s | small p99 ms | small proxy CPU µs/req | 1m MB/s "
        "| big MB/s | big ttfb s | peak RSS MiB (big) | errors | remarks |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cand in candidates:
        errors = sum(
            int(_num(p["errors"]) or 0) for run in runs for p in run if p["candidate"] == cand
        )
        out.append(
            f"| {cand} | {_fmt(get(cand, 'small'), 'small')} "
            f"| {_cell(get(cand, 'small', 'p99_ms'))} "
            f"| {cpu_per_request(cand)} | {_cell(get(cand, '1m'))} | {_cell(get(cand, 'big'))} "
            f"| {_cell(_median(note(cand, 'big', 'ttfb_s')))} "
            f"| {_cell(get(cand, 'big', 'peak_rss_mb'))} | {errors} "
            f"| {'; '.join(f'{sc} {flags(cand, sc)}' for sc in UNITS if flags(cand, sc))} |"
        )
    ours = [c for c in candidates if c.startswith("authproxy")]
    out += [
        "",
        f"authproxy against the peers (shared harness, {where}; ratios within each run):",
        "",
        "| candidate | scenario | value | / werkzeug_proxy | / go_httputil | p99 ms "
        "| p99 / go p99 | peak RSS MiB | remarks |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cand in ours:
        for scenario in UNITS:
            out.append(
                f"| {cand} | {scenario} | {_fmt(get(cand, scenario), scenario)} {UNITS[scenario]} "
                f"| {ratio(cand, 'werkzeug_proxy', scenario)} "
                f"| {ratio(cand, 'go_httputil', scenario)} "
                f"| {_cell(get(cand, scenario, 'p99_ms'))} "
                f"| {ratio(cand, 'go_httputil', scenario, 'p99_ms')} "
                f"| {_cell(get(cand, scenario, 'peak_rss_mb'))} | {flags(cand, scenario)} |"
            )
    kept = frac("authproxy_pipeline", "authproxy_pipeline_noid", "small")
    if kept is not None:
        out += [
            "",
            f"Identity on vs off in the harness (small): {(1 - kept) * 100:+.1f} % "
            "(authproxy_pipeline has one more inject-headers step, which adds the token).",
        ]
    if "authproxy_forwarder" in ours:
        out += [
            "",
            "By design the harness's `check` fails for authproxy_forwarder ((a) injects "
            "no Authorization) and for gunicorn_hello (it forwards nothing; its 1m row "
            "is a 100-byte answer).",
        ]
    full = next((c for c in ("authproxy_pipeline", "authproxy_pipeline_noid") if c in ours), None)
    if full is None:
        return out
    out += [
        "",
        f"Targets of issue 8 ({full}; identity and RSS growth from this run's own rows):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def target(text: str, measured: float | None, ok: bool | None, fmt: str = "{:.2f}") -> None:
        shown = "-" if measured is None else fmt.format(measured)
        out.append(f"| {text} | {shown} | {'-' if ok is None else ('yes' if ok else 'NO')} |")

    small_wz = frac(full, "werkzeug_proxy", "small")
    small_go = frac(full, "go_httputil", "small")
    m1_go = frac(full, "go_httputil", "1m")
    big_go = frac(full, "go_httputil", "big")
    p99_go = frac(full, "go_httputil", "small", "p99_ms")
    target("small req/s >= 1.5x werkzeug_proxy", small_wz, _ge(small_wz, 1.5))
    target("small req/s >= 0.5x go_httputil", small_go, _ge(small_go, 0.5))
    target("1m MB/s >= go_httputil", m1_go, _ge(m1_go, 1.0))
    target("big MB/s >= go_httputil", big_go, _ge(big_go, 1.0))
    target("small p99 <= 2x go_httputil", p99_go, None if p99_go is None else p99_go <= 2.0)
    costs = identity_costs(rows, "small")
    if costs:
        cost = statistics.median(costs)
        target("identity on vs off < 10 % (small, own rounds)", cost, cost < 10, "{:+.1f} %")
    merged = merge_rounds(rows)
    config = next((c for c in ("pipeline", "noidentity") if _find(merged, c, "big")), None)
    for scenario in ("1m", "big") if config else ():
        r = _find(merged, config or "", scenario)
        if r and r["rss_peak_mib"] is not None and r["rss_idle_mib"] is not None:
            streams = 1 if scenario == "big" else (r.get("connections") or 1)
            per = (r["rss_peak_mib"] - r["rss_idle_mib"]) / streams
            target(
                f"RSS above idle per stream < 16 MiB ({config}, {scenario})",
                per,
                per < 16,
                "{:.1f} MiB",
            )
    return out


def _fmt(value: float | None, scenario: str) -> str:
    """Requests/s without decimals, MB/s with one."""
    if value is None:
        return "-"
    return f"{value:.0f}" if scenario == "small" else f"{value:.1f}"


def _ge(value: float | None, floor: float) -> bool | None:
    return None if value is None else value >= floor


def report(args: argparse.Namespace) -> None:
    rows = load_rows(args.rows)
    lines = own_table(rows) + identity_difference(rows)
    if args.peers:
        lines += peers_tables([load_peers(path) for path in args.peers], rows)
    print("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wrk")
    for name in ("rows", "config", "scenario", "output", "watch"):
        p.add_argument(name)
    p.add_argument("--expect-status", type=int)
    p.add_argument("--connections", type=int, help="wrk's -c")
    p.add_argument("--conns", help="connections per proxy process, busiest first: 20/12")
    p.add_argument("--processes", type=int, help="worker processes accepting connections")
    p.set_defaults(func=record_wrk)
    p = sub.add_parser("curl")
    for name in ("rows", "config", "scenario", "output", "watch"):
        p.add_argument(name)
    p.add_argument("--size", type=int, required=True)
    p.set_defaults(func=record_curl)
    p = sub.add_parser("check")
    for name in ("rows", "config", "errors", "note"):
        p.add_argument(name)
    p.set_defaults(func=record_check)
    p = sub.add_parser("report")
    p.add_argument("rows")
    p.add_argument("--peers", nargs="+", help="one TSV per run of the peers' harness")
    p.set_defaults(func=report)
    args = parser.parse_args(argv[1:])
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
