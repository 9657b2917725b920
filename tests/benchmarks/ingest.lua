-- wrk script: POST realistic agent reports to /api/v1/ingest over keep-alive.
--
--   wrk -tT -c64 -d20s -s ingest.lua http://127.0.0.1:PORT -- TEMPLATE TOKEN NODES BASE_TS T
--
-- TEMPLATE is a file holding one real report (from cloudmon-agent --once) in
-- which the node id was replaced by %s and the timestamp by %.3f.  Requests
-- cycle node ids over NODES distinct ids (bench-0 .. bench-N-1) and advance the
-- timestamp by one second per full cycle, so every request is a distinct sample
-- (as NODES agents reporting once a second would send).  With several wrk
-- threads each thread takes its own share of the sequence.

local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
end

function init(args)
   local f = assert(io.open(args[1], "r"))
   template = f:read("*a")
   f:close()
   token = args[2]
   nodes = tonumber(args[3])
   base_ts = tonumber(args[4])
   nthreads = tonumber(args[5] or "1")
   i = 0
   headers = {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer " .. token,
   }
end

function request()
   -- Global sequence number k = i * nthreads + tid: distinct across threads.
   local k = i * nthreads + tid
   i = i + 1
   local node = k % nodes
   local cycle = math.floor(k / nodes)
   local body = string.format(template, "bench-" .. node, base_ts + cycle)
   return wrk.format("POST", "/api/v1/ingest", headers, body)
end
