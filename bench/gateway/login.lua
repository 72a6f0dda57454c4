-- wrk script: POST /login as a random seeded user (user<i> / password<i>).
-- GATEWAY_USERS tells how many users the database holds; GATEWAY_BAD_SHARE
-- (0..1, default 0) sends that share of wrong passwords.
local users = tonumber(os.getenv("GATEWAY_USERS") or "100000")
local bad_share = tonumber(os.getenv("GATEWAY_BAD_SHARE") or "0")
local counter = 0
local headers = { ["Content-Type"] = "application/json" }

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0) * 7919)
end

request = function()
  local i = math.random(0, users - 1)
  local password = "password" .. i
  if bad_share > 0 and math.random() < bad_share then
    password = "wrong"
  end
  local body = '{"username":"user' .. i .. '","password":"' .. password .. '"}'
  return wrk.format("POST", "/login", headers, body)
end
