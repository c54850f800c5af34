-- wrk script for bench/load.sh: one fixed request per scenario, described by environment
-- variables (each wrk thread runs this file, so every thread sends the same request):
--   BENCH_METHOD     GET (default) or POST
--   BENCH_AUTH       the whole Authorization header value ("Bearer ..." or "Basic ...")
--   BENCH_OBO        On-Behalf-Of header value (the direct baseline only; empty = none)
--   BENCH_BODY_FILE  file sent as the application/json body (empty = no body)
-- done() prints one machine-readable "BENCH k=v ..." line that load.sh parses.

wrk.method = os.getenv("BENCH_METHOD") or "GET"

local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

local obo = os.getenv("BENCH_OBO")
if obo ~= nil and obo ~= "" then
  wrk.headers["On-Behalf-Of"] = obo
end

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file ~= nil and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%.1f " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
