-- wrk script of scripts/bench-api (issue 17): load on the inventory API.
--
-- BENCH_MODE=query    GET /api/v1/stores/{store}/products/{product}/stock, store and product
--                     drawn at random among BENCH_STORES × BENCH_PRODUCTS
-- BENCH_MODE=reserve  POST /api/v1/inventory/reserve of 1 unit of a random store and product,
--                     each request with a transactionId of its own (BENCH-<run>-<thread>-<n>), so
--                     every request is a new reservation through the saga, never an idempotent
--                     replay
-- Ids: stores ST-B001.., products P-B001.., HQ BENCH_HQ; BENCH_RUN keeps transactionIds of
-- separate runs apart. Prints one JSON line at the end (latencies in ms, wrk's own histogram):
-- requests, rps, p50/p90/p99/max/mean, and the answers by status class.
local mode = os.getenv("BENCH_MODE") or "query"
local stores = tonumber(os.getenv("BENCH_STORES") or "10")
local products = tonumber(os.getenv("BENCH_PRODUCTS") or "100")
local hq = os.getenv("BENCH_HQ") or "HQ-BENCH"
local run = os.getenv("BENCH_RUN") or tostring(os.time())

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(id * 7919 + 17)
  n, ok, conflict, client_error, server_error = 0, 0, 0, 0, 0
end

function request()
  n = n + 1
  local s, p = math.random(stores), math.random(products)
  if mode == "query" then
    return wrk.format("GET", string.format("/api/v1/stores/ST-B%03d/products/P-B%03d/stock", s, p))
  end
  local body = string.format(
    '{"hqId":"%s","storeId":"ST-B%03d","items":[{"productId":"P-B%03d","quantity":1}],"transactionId":"BENCH-%s-%d-%d"}',
    hq, s, p, run, id, n)
  return wrk.format("POST", "/api/v1/inventory/reserve", { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  elseif status == 409 then
    conflict = conflict + 1
  elseif status < 500 then
    client_error = client_error + 1
  else
    server_error = server_error + 1
  end
end

function done(summary, latency, requests)
  local totals = { ok = 0, conflict = 0, client_error = 0, server_error = 0 }
  for _, t in ipairs(threads) do
    for k, _ in pairs(totals) do
      totals[k] = totals[k] + (t:get(k) or 0)
    end
  end
  local e = summary.errors
  local seconds = summary.duration / 1e6
  io.write(string.format(
    '{"mode":"%s","requests":%d,"seconds":%.3f,"rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f,' ..
    '"ok":%d,"conflict":%d,"client_error":%d,"server_error":%d,"socket_errors":%d}\n',
    mode, summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000,
    totals.ok, totals.conflict, totals.client_error, totals.server_error,
    e.connect + e.read + e.write + e.timeout))
end
