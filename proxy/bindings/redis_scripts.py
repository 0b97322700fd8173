"""Lua scripts for the Redis store: each is one round trip and atomic on its X.

Data model (docs/bindings.md has the full picture). For middle number X and prefix P:

    P{X}     hash   AXB: field <A> = "<B>:<exp_ms>", field <B> = "<A>:<exp_ms>"
                    AXN: field "*" = "<A>:<B or empty>:<exp_ms>"
    P{X}:e   zset   one member per binding (its A, or "*" for AXN), score = exp_ms

    AXB with optional fields (id, tenant, direction, ...): field "m:<A>" = "<d>|<B>|<json>"
    AXN with optional fields: field "m:*" = "b|<B or empty>|<json>"
    (d: "b" both ways, "a" only A calls, "r" only B calls; json: the other optional fields)

Both keys carry the hash tag {X}, so they share a Cluster slot and a script may touch both.
Expiry lives in each value (checked on every read) and in the zset, which lets every write
collect expired bindings of X in expiry order; both keys expire at the latest live expiry.
Times are unix milliseconds supplied by the client.
"""

from __future__ import annotations

# The binding hash's housekeeping, shared with the binding API's scripts
# (proxy/api/redis_scripts.py): h and z are X's hash and zset, times unix milliseconds.
BINDING_LUA = r"""
local function exp_of(v) return tonumber(string.match(v, ':(%d+)$')) end
local function other_of(v) return string.match(v, '^(%d*):') end

-- Remove the AXB binding whose field `f` holds `v`, and its partner field if it points back.
-- Its optional fields live under "m:" and its A, which is f or the partner: both go.
local function drop_axb(h, z, f, v)
  local other = other_of(v)
  redis.call('HDEL', h, f, 'm:' .. f, 'm:' .. other)
  redis.call('ZREM', z, f)
  local ov = redis.call('HGET', h, other)
  if ov and other_of(ov) == f then
    redis.call('HDEL', h, other)
    redis.call('ZREM', z, other)
  end
end

-- Collect up to `limit` expired bindings (oldest first) so X's hash does not grow forever;
-- returns how many.
local function collect(h, z, now, limit)
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(dead) do
    if m == '*' then
      redis.call('HDEL', h, '*', 'm:*')
      redis.call('ZREM', z, '*')
    else
      local v = redis.call('HGET', h, m)
      if v then drop_axb(h, z, m, v) else redis.call('ZREM', z, m) end
    end
  end
  return #dead
end

-- Both keys live exactly as long as the longest-lived binding on X.
local function set_expiry(h, z)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', h, last[2])
    redis.call('PEXPIREAT', z, last[2])
  else
    redis.call('DEL', h, z)
  end
end
"""

# Prepended to the scripts that write: their KEYS are X's hash and zset.
_HELPERS = "local h, z = KEYS[1], KEYS[2]\n" + BINDING_LUA

# KEYS: hash, zset. ARGV: caller, now_ms.
# Returns {code, callee, exp_ms, meta, leg}: code 1 ROUTE, 2 NOT_PARTY, 0 NO_BINDING,
# 3 DIRECTION_RESTRICTED (a one-way binding called the other way); meta: the binding's optional
# fields as stored ("<d>|<B>|<json>"), or ''; leg (routed calls, for the call record): 'a' the
# caller is A, 'b' the caller is B, 'n' anyone calling an AXN's A. One HMGET more than a plain
# lookup, only when the caller is routed (and one ZSCORE for an AXB without optional fields).
RESOLVE = r"""
local now = tonumber(ARGV[2])
local caller = ARGV[1]
local v = redis.call('HMGET', KEYS[1], caller, '*')
if v[1] then
  local other, exp = string.match(v[1], '^(%d+):(%d+)$')
  if other and tonumber(exp) > now then
    local m = redis.call('HMGET', KEYS[1], 'm:' .. caller, 'm:' .. other)
    if m[1] then  -- the caller is the binding's A when its B is the other party
      local d, b = string.match(m[1], '^(%a)|(%d*)|')
      if b == other then
        if d == 'r' then return {3, '', exp, m[1], ''} end
        return {1, other, exp, m[1], 'a'}
      end
    end
    if m[2] then
      local d, b = string.match(m[2], '^(%a)|(%d*)|')
      if b == caller then
        if d == 'a' then return {3, '', exp, m[2], ''} end
        return {1, other, exp, m[2], 'b'}
      end
    end
    if redis.call('ZSCORE', KEYS[2], caller) then return {1, other, exp, '', 'a'} end
    return {1, other, exp, '', 'b'}
  end
end
if v[2] then
  local a, b, exp = string.match(v[2], '^(%d+):(%d*):(%d+)$')
  if a and tonumber(exp) > now then
    local meta = redis.call('HGET', KEYS[1], 'm:*') or ''
    if ARGV[1] ~= a then return {1, a, exp, meta, 'n'} end
    if b ~= '' then return {1, b, exp, meta, 'a'} end
    return {2, '', exp, meta, ''}
  end
end
if redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[2], '+inf') > 0 then return {2, '', '0', '', ''} end
return {0, '', '0', '', ''}
"""

# KEYS: hash, zset. ARGV: kind, a, b ('' for none), exp_ms, now_ms, channel ('' = no publish),
# invalidation message ("<origin> <x>"), optional fields ("<d>|<B>|<json>", '' for none).
# Returns 1 (new), 2 (renewal of the same parties) or an error reply starting with CONFLICT.
# The common case (a new AXB on a quiet X) costs six redis.call()s.
BIND = (
    _HELPERS
    + r"""
local kind, a, b, exp, now, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
collect(h, z, now, 64)
local result = 1
local cur = redis.call('HMGET', h, '*', a, b)
local star, va, vb = cur[1], cur[2], cur[3]
if star and exp_of(star) <= now then
  redis.call('HDEL', h, '*', 'm:*')
  redis.call('ZREM', z, '*')
  star = nil
end
if kind == 'axn' then
  if star then
    if string.match(star, '^(%d+):') ~= a then
      return redis.error_reply('CONFLICT x carries another axn binding')
    end
    result = 2
  elseif redis.call('ZCOUNT', z, '(' .. now, '+inf') > 0 then
    return redis.error_reply('CONFLICT x carries axb bindings')
  end
  redis.call('HSET', h, '*', a .. ':' .. b .. ':' .. exp)
  redis.call('ZADD', z, exp, '*')
  if ARGV[8] ~= '' then redis.call('HSET', h, 'm:*', ARGV[8])
  else redis.call('HDEL', h, 'm:*') end
else
  if star then return redis.error_reply('CONFLICT x carries an axn binding') end
  if va and exp_of(va) <= now then
    drop_axb(h, z, a, va); va = nil; vb = redis.call('HGET', h, b)
  end
  if vb and exp_of(vb) <= now then
    drop_axb(h, z, b, vb); vb = nil; va = redis.call('HGET', h, a)
  end
  if va or vb then
    if not (va and vb and other_of(va) == b and other_of(vb) == a) then
      return redis.error_reply('CONFLICT a party is already bound on x')
    end
    result = 2
    redis.call('ZREM', z, b)  -- a renewal may swap which party is A
    redis.call('HDEL', h, 'm:' .. b)
  end
  redis.call('HSET', h, a, b .. ':' .. exp, b, a .. ':' .. exp)
  redis.call('ZADD', z, exp, a)
  if ARGV[8] ~= '' then redis.call('HSET', h, 'm:' .. a, ARGV[8])
  else redis.call('HDEL', h, 'm:' .. a) end
end
-- Keys live until the latest expiry on X. A renewal to a shorter TTL leaves them a little
-- longer; values carry their own expiry, so that only delays the cleanup.
local current = redis.call('PEXPIRETIME', h)
if current < tonumber(exp) then
  redis.call('PEXPIREAT', h, exp)
  redis.call('PEXPIREAT', z, exp)
end
if channel ~= '' then redis.call('PUBLISH', channel, ARGV[7]) end
return result
"""
)

# KEYS: hash, zset. ARGV: number, now_ms, channel ('' = no publish), invalidation message.
# Returns 1 if a live binding was removed, 0 otherwise.
UNBIND = (
    _HELPERS
    + r"""
local number, now, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local removed = 0
local v = redis.call('HGET', h, number)
if v then
  if exp_of(v) > now then removed = 1 end
  drop_axb(h, z, number, v)
else
  local star = redis.call('HGET', h, '*')
  if star and string.match(star, '^(%d+):') == number then
    if exp_of(star) > now then removed = 1 end
    redis.call('HDEL', h, '*', 'm:*')
    redis.call('ZREM', z, '*')
  end
end
if removed == 1 then
  set_expiry(h, z)
  if channel ~= '' then redis.call('PUBLISH', channel, ARGV[4]) end
end
return removed
"""
)

# KEYS: hash, zset. ARGV: now_ms, limit.
# Returns a flat list: kind, a, b, exp_ms, optional fields ("<d>|<B>|<json>" or '') for each
# live binding on X (soonest expiry first).
GET = r"""
local out = {}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
for _, m in ipairs(live) do
  local v = redis.call('HMGET', KEYS[1], m, 'm:' .. m)
  if v[1] then
    if m == '*' then
      local a, b, exp = string.match(v[1], '^(%d+):(%d*):(%d+)$')
      table.insert(out, 'axn'); table.insert(out, a); table.insert(out, b); table.insert(out, exp)
    else
      local b, exp = string.match(v[1], '^(%d+):(%d+)$')
      table.insert(out, 'axb'); table.insert(out, m); table.insert(out, b); table.insert(out, exp)
    end
    table.insert(out, v[2] or '')
  end
end
return out
"""
