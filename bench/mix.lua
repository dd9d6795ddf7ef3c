-- wrk script: a 90/10 read/create mix on one connection's request stream.
-- Every tenth request registers a runner; the rest read the default page.
-- The Authorization header comes from wrk's -H, which lands in wrk.headers.

local n = 0
local read, create

function init(args)
   read = wrk.format("GET", "/v1/runner")
   local headers = {}
   for k, v in pairs(wrk.headers) do headers[k] = v end
   headers["Content-Type"] = "application/json"
   create = wrk.format("POST", "/v1/runner", headers,
      '{"name":"bench runner","endpoint":"http://10.0.0.1:8188",' ..
      '"tags":["bench"],"headers":{"X-Bench":"1"}}')
end

function request()
   n = n + 1
   if n % 10 == 0 then return create end
   return read
end
