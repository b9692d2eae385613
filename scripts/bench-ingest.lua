-- wrk script for scripts/bench-ingest.sh: POSTs {"user_id": <a random real user>, "timestamp":
-- 2000000000} as application/json, picking the user from a file of ids (one per line, given as
-- the first argument after --), and counts every answer that is not 200.
--   wrk -t2 -c64 -d20s --latency -s scripts/bench-ingest.lua URL -- users.txt

local bodies = {}
non200 = 0 -- global, so that done() can read each thread's count with thread:get

function init(args)
  local path = args[1] or "users.txt"
  for line in io.lines(path) do
    if #line > 0 then
      bodies[#bodies + 1] = '{"user_id": "' .. line .. '", "timestamp": 2000000000}'
    end
  end
  if #bodies == 0 then
    error("no user ids in " .. path)
  end
  -- A different sequence per thread.
  math.randomseed(os.time() + tonumber(tostring(bodies):match("0x(%x+)") or "0", 16) % 1000003)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  return wrk.format(nil, nil, nil, bodies[math.random(#bodies)])
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  end
end

local threads = {}
function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do
    total = total + (tonumber(t:get("non200")) or 0)
  end
  io.write(string.format("non200 %d\n", total))
  io.write(string.format("errors %d\n", summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.status + summary.errors.timeout))
  io.write(string.format("summary rps=%.0f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f requests=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, summary.requests))
end
