"""Record benchmark rows and print them as markdown.

usage:
  results.py wrk   ROWS CONFIG SCENARIO WRK_OUTPUT WATCH_JSON [--expect-status 401] [--conns SPLIT]
  results.py curl  ROWS CONFIG SCENARIO CURL_OUTPUT WATCH_JSON --size BYTES
  results.py check ROWS CONFIG ERRORS NOTE
  results.py report ROWS [--peers HARNESS_TSV]

ROWS is a JSON-lines file, one object per measured row (see ``_row``).
``report`` prints the table of this run, the identity on/off difference and,
with ``--peers``, authproxy's figures against the peers measured by the
shared harness in the same invocation, with the issue's targets.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

NOISY_SHARE = 0.05  # foreign processes used more than this share of the machine
UNITS = {"small": "req/s", "1m": "MB/s", "big": "MB/s"}
LABELS = {
    "forwarder": "(a) forwarder only",
    "pipeline": "(b) full pipeline, identity verifying",
    "refusing": "(c) full pipeline, identity refusing",
    "noidentity": "(d) full pipeline without identity",
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
        config=config, scenario=scenario, unit=UNITS.get(scenario, ""), errors=0, flags=[], note=""
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


def own_table(rows: list[dict[str, Any]]) -> list[str]:
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
        value = f"{_cell(r['value'])} {r['unit']}" if r["value"] is not None else "-"
        rss = (
            f"{_cell(r['rss_peak_mib'])} ({_cell(r['rss_idle_mib'])})"
            if r["rss_peak_mib"] is not None
            else "-"
        )
        remarks = list(r["flags"])
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


def identity_difference(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for scenario in UNITS:
        on, off = _find(rows, "pipeline", scenario), _find(rows, "noidentity", scenario)
        if on and off and on["value"] and off["value"]:
            diff = (off["value"] - on["value"]) / off["value"] * 100
            out.append(f"| {scenario} | {on['value']} | {off['value']} | {diff:+.1f} % |")
    if not out:
        return []
    return [
        "",
        "Identity on vs off (same run; positive = identity costs throughput):",
        "",
        "| scenario | (b) identity on | (d) identity off | cost |",
        "|---|--:|--:|--:|",
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


def peers_tables(peers: list[dict[str, str]], rows: list[dict[str, Any]]) -> list[str]:
    def get(candidate: str, scenario: str, column: str = "rps_or_MBps") -> float | None:
        return next(
            (
                _num(p[column])
                for p in peers
                if p["candidate"] == candidate and p["scenario"] == scenario
            ),
            None,
        )

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "-"

    def note(candidate: str, scenario: str, key: str) -> float | None:
        for p in peers:
            if p["candidate"] == candidate and p["scenario"] == scenario:
                found = re.search(rf"(?:^|[\s,:]){re.escape(key)}=([0-9.]+)", p["note"])
                return _num(found.group(1)) if found else None
        return None

    def flags(candidate: str, scenario: str) -> str:
        for p in peers:
            if p["candidate"] == candidate and p["scenario"] == scenario:
                found = [f for f in ("NOISY", "UNBALANCED") if f in p["note"]]
                return " ".join(found)
        return ""

    candidates = list(dict.fromkeys(p["candidate"] for p in peers))
    out = [
        "",
        "All candidates of the peers' harness (same invocation):",
        "",
        "| candidate | small req/s | small p99 ms | small proxy CPU µs/req | 1m MB/s "
        "| big MB/s | big ttfb s | peak RSS MiB (big) | errors | remarks |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cand in candidates:
        cpu, requests = note(cand, "small", "proxy"), note(cand, "small", "requests")
        per_req = f"{cpu / requests * 1e6:.0f}" if cpu is not None and requests else "-"
        errors = sum(int(_num(p["errors"]) or 0) for p in peers if p["candidate"] == cand)
        out.append(
            f"| {cand} | {_fmt(get(cand, 'small'), 'small')} "
            f"| {_cell(get(cand, 'small', 'p99_ms'))} "
            f"| {per_req} | {_cell(get(cand, '1m'))} | {_cell(get(cand, 'big'))} "
            f"| {_cell(note(cand, 'big', 'ttfb_s'))} "
            f"| {_cell(get(cand, 'big', 'peak_rss_mb'))} | {errors} "
            f"| {'; '.join(f'{sc} {flags(cand, sc)}' for sc in UNITS if flags(cand, sc))} |"
        )
    ours = [c for c in candidates if c.startswith("authproxy")]
    out += [
        "",
        "authproxy against the peers (shared harness, same invocation):",
        "",
        "| candidate | scenario | value | / werkzeug_proxy | / go_httputil | p99 ms "
        "| p99 / go p99 | peak RSS MiB | remarks |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for cand in ours:
        for scenario in UNITS:
            value = get(cand, scenario)
            p99 = get(cand, scenario, "p99_ms")
            out.append(
                f"| {cand} | {scenario} | {_fmt(value, scenario)} {UNITS[scenario]} "
                f"| {ratio(value, get('werkzeug_proxy', scenario))} "
                f"| {ratio(value, get('go_httputil', scenario))} | {_cell(p99)} "
                f"| {ratio(p99, get('go_httputil', scenario, 'p99_ms'))} "
                f"| {_cell(get(cand, scenario, 'peak_rss_mb'))} | {flags(cand, scenario)} |"
            )
    on, off = get("authproxy_pipeline", "small"), get("authproxy_pipeline_noid", "small")
    if on and off:
        out += [
            "",
            f"Identity on vs off in the harness (small): {(off - on) / off * 100:+.1f} % "
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

    def frac(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    small_wz = frac(get(full, "small"), get("werkzeug_proxy", "small"))
    small_go = frac(get(full, "small"), get("go_httputil", "small"))
    m1_go = frac(get(full, "1m"), get("go_httputil", "1m"))
    big_go = frac(get(full, "big"), get("go_httputil", "big"))
    p99_go = frac(get(full, "small", "p99_ms"), get("go_httputil", "small", "p99_ms"))
    target("small req/s >= 1.5x werkzeug_proxy", small_wz, _ge(small_wz, 1.5))
    target("small req/s >= 0.5x go_httputil", small_go, _ge(small_go, 0.5))
    target("1m MB/s >= go_httputil", m1_go, _ge(m1_go, 1.0))
    target("big MB/s >= go_httputil", big_go, _ge(big_go, 1.0))
    target("small p99 <= 2x go_httputil", p99_go, None if p99_go is None else p99_go <= 2.0)
    on_row, off_row = _find(rows, "pipeline", "small"), _find(rows, "noidentity", "small")
    if on_row and off_row and on_row["value"] and off_row["value"]:
        cost = (off_row["value"] - on_row["value"]) / off_row["value"] * 100
        target("identity on vs off < 10 % (small, own run)", cost, cost < 10, "{:+.1f} %")
    config = next((c for c in ("pipeline", "noidentity") if _find(rows, c, "big")), None)
    for scenario in ("1m", "big") if config else ():
        r = _find(rows, config or "", scenario)
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
        lines += peers_tables(load_peers(args.peers), rows)
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
    p.add_argument("--peers")
    p.set_defaults(func=report)
    args = parser.parse_args(argv[1:])
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
