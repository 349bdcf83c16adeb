-- Loaded with `wrk -s bench/lib/summary.lua`: after the run, print one JSON
-- line (prefixed BENCH_WRK) that bench/run.sh records. No per-request hooks,
-- so the load generator costs what plain wrk costs.
done = function(summary, latency, requests)
  local errors = summary.errors
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"bytes":%.0f', summary.bytes),
    string.format('"duration_us":%.0f', summary.duration),
    string.format('"p50_us":%.1f', latency:percentile(50)),
    string.format('"p90_us":%.1f', latency:percentile(90)),
    string.format('"p99_us":%.1f', latency:percentile(99)),
    string.format('"max_us":%.1f', latency.max),
    string.format('"connect_errors":%d', errors.connect),
    string.format('"read_errors":%d', errors.read),
    string.format('"write_errors":%d', errors.write),
    string.format('"non_2xx_3xx":%d', errors.status),
    string.format('"timeouts":%d', errors.timeout),
  }
  io.write("BENCH_WRK {" .. table.concat(fields, ",") .. "}\n")
end
