"""Lua scripts of the binding API: each change is one atomic script, audit entry included.

Keys, for the store's key prefix P (the X keys are the store's own, see bindings/redis_scripts):

    P{X}, P{X}:e             the bindings on X (field "m:<A>" holds a binding's optional fields)
    Pb:<id>                  string   the binding's record (JSON), expires with the binding
    Pn:<tenant>:<number>     zset     ids of the tenant's bindings with that party (score exp_ms)
    Po:<tenant>:<order_id>   zset     ids of the tenant's bindings for that order
    Pr:<tenant>:<request_id> string   the id a request_id created (idempotent retries)
    Ph:<id>                  list     the audit entry ids of that binding (its history)
    Pp:<tenant>:<area>:free  set      pool numbers with room for another AXB pair
    Pp:<tenant>:<area>:empty set      pool numbers with no live binding (AXN takes only these)
    Pp:<tenant>:<area>:full  zset     numbers at max_pairs_per_x (or holding an AXN), score =
                                      their earliest expiry: when they may have room again
    Pp:<tenant>:<area>:busy  zset     numbers with a binding, score = their latest expiry
    Pp:<tenant>:<area>:v     string   digest of the configured pool the sets were built from

`<area>` is the pool entry's area code, or "-" for entries without one. The X keys are chosen
inside the script, so these scripts need a standalone Redis (or Sentinel), not Cluster.

Allocation (why it stays cheap with pools of many thousands): the free set holds only numbers
with room, so a draw is one SRANDMEMBER (then 8 distinct ones), each checked exactly against its
X hash (live count under the cap, neither A nor B bound there). A candidate fails only when A
or B already has a live binding on it (or the sets were stale, which the check repairs for
good), so when the random ones fail the script walks the set with SSCAN and finds a free X
within |bindings of A| + |bindings of B| + 1 distinct checks: never a full scan of a large pool
unless the parties themselves are bound on most of it. Numbers regain room when bindings
expire: `full`/`busy` are ordered by that time; before answering "no free number" the script
moves every one that is due back and draws again, so a 409 is exact (and the common path
never pays for that bookkeeping).
"""

from __future__ import annotations

from proxy.bindings.redis_scripts import BINDING_LUA

_HELPERS = (
    r"""
local P = ARGV[1]
local now = tonumber(ARGV[2])
local function xkeys(x) return P .. '{' .. x .. '}', P .. '{' .. x .. '}:e' end
"""
    + BINDING_LUA
    + r"""
local function live(v) return v and exp_of(v) > now end

local function raise_expiry(key, exp)
  if redis.call('PEXPIRETIME', key) < tonumber(exp) then redis.call('PEXPIREAT', key, exp) end
end

-- Put X in the pool sets its live bindings call for (pk: "Pp:<tenant>:<area>:").
local function reclassify(pk, x, h, z, cap)
  local count = redis.call('ZCOUNT', z, '(' .. now, '+inf')
  if count == 0 then
    redis.call('SADD', pk .. 'free', x)
    redis.call('SADD', pk .. 'empty', x)
    redis.call('ZREM', pk .. 'full', x)
    redis.call('ZREM', pk .. 'busy', x)
    return
  end
  redis.call('SREM', pk .. 'empty', x)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  redis.call('ZADD', pk .. 'busy', last[2], x)
  local star = redis.call('ZSCORE', z, '*')
  if (star and tonumber(star) > now) or count >= cap then
    redis.call('SREM', pk .. 'free', x)
    local first = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    redis.call('ZADD', pk .. 'full', first[2], x)
  else
    redis.call('SADD', pk .. 'free', x)
    redis.call('ZREM', pk .. 'full', x)
  end
end

-- Numbers whose time in `which` (full or busy) has come: look at them again.
local function release(pk, cap, which, limit)
  local due = redis.call('ZRANGEBYSCORE', pk .. which, '-inf', now, 'LIMIT', 0, limit)
  for _, x in ipairs(due) do
    local h, z = xkeys(x)
    if collect(h, z, now, 1000) > 0 then set_expiry(h, z) end
    reclassify(pk, x, h, z, cap)
  end
  return #due
end

-- Can A and B (b may be '') take X? Returns ok, full (full: X has no room for any pair).
local function fits_axb(h, z, a, b, cap)
  collect(h, z, now, 64)
  local cur = redis.call('HMGET', h, '*', a, b)
  local star, va, vb = cur[1], cur[2], cur[3]
  if live(star) then return false, true end
  if va and not live(va) then drop_axb(h, z, a, va); va = nil; vb = redis.call('HGET', h, b) end
  if vb and not live(vb) then drop_axb(h, z, b, vb); vb = nil end
  if redis.call('ZCOUNT', z, '(' .. now, '+inf') >= cap then return false, true end
  if va or vb then return false, false end
  return true, false
end

local function fits_axn(h, z)
  collect(h, z, now, 64)
  return redis.call('ZCOUNT', z, '(' .. now, '+inf') == 0
end

local function write_binding(h, z, kind, a, b, exp, meta)
  if kind == 'axn' then
    redis.call('HSET', h, '*', a .. ':' .. b .. ':' .. exp, 'm:*', meta)
    redis.call('ZADD', z, exp, '*')
  else
    redis.call('HSET', h, a, b .. ':' .. exp, b, a .. ':' .. exp, 'm:' .. a, meta)
    redis.call('ZADD', z, exp, a)
  end
  if redis.call('PEXPIRETIME', h) < tonumber(exp) then  -- the two keys expire together
    redis.call('PEXPIREAT', h, exp)
    redis.call('PEXPIREAT', z, exp)
  end
end

-- Remove the binding (kind, a, b) from X if it is still the one stored there.
local function remove_binding(h, z, kind, a, b)
  if kind == 'axn' then
    local star = redis.call('HGET', h, '*')
    if star and string.match(star, '^(%d+):') == a then
      redis.call('HDEL', h, '*', 'm:*')
      redis.call('ZREM', z, '*')
    end
    return
  end
  local v = redis.call('HGET', h, a)
  if v and other_of(v) == b then drop_axb(h, z, a, v) end
end

-- Index keys live max_ttl past their last write (every member expires before that); expired
-- members are skipped by every read and swept now and then (1 write in 16).
local function index_add(key, exp, id, ttl_ms)
  if string.sub(id, -1) == '0' then redis.call('ZREMRANGEBYSCORE', key, '-inf', now) end
  redis.call('ZADD', key, exp, id)
  redis.call('PEXPIRE', key, ttl_ms)
end

-- After a new binding on X: what reclassify would do, knowing X has one more binding.
local function classify_after_write(pk, x, z, kind, exp, cap)
  redis.call('SREM', pk .. 'empty', x)
  redis.call('ZADD', pk .. 'busy', 'GT', exp, x)
  if kind == 'axn' or redis.call('ZCOUNT', z, '(' .. now, '+inf') >= cap then
    redis.call('SREM', pk .. 'free', x)
    local first = redis.call('ZRANGEBYSCORE', z, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    redis.call('ZADD', pk .. 'full', first[2], x)
  end
end

-- Append to the audit stream; the entry id also goes to the binding's history list.
-- audit: {stream, minid ('' none), max_entries ('' none), history_ttl_ms}
local function audit(a, id, fields)
  local args = {'XADD', a[1]}
  if a[2] ~= '' then table.insert(args, 'MINID'); table.insert(args, '~');
    table.insert(args, a[2]) end
  table.insert(args, '*')
  for _, f in ipairs(fields) do table.insert(args, f) end
  local eid = redis.call(unpack(args))
  if a[3] ~= '' then redis.call('XTRIM', a[1], 'MAXLEN', '~', a[3]) end
  if id ~= '' then
    local hk = P .. 'h:' .. id
    redis.call('RPUSH', hk, eid)
    redis.call('PEXPIRE', hk, a[4])
  end
  return eid
end
"""
)

# ARGV: 1 prefix, 2 now_ms, 3 tenant, 4 request_id ('' none), 5 id, 6 kind, 7 a, 8 b ('' none),
# 9 exp_ms, 10 x ('' = allocate), 11 areas to try, space separated, in order ('-' = no area),
# 12 max_pairs_per_x, 13 optional fields for the X hash, 14 record template (JSON starting
# with '{"x":"",'), 15 order_id ('' none), 16-19 audit: stream, minid, max_entries, history
# ttl ms, 20 key id, 21 source address, 22 channel, 23 invalidation origin, 24 index key life
# (ms: api.max_ttl_s).
# Returns {1, record} created, {2, record} the request_id's earlier binding, or {0, reason}:
# 'x_taken' (explicit x cannot take the pair) or 'no_free_x'.
CREATE = _HELPERS + r"""
local tenant, rid, id, kind, a, b, exp, x = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7],
  ARGV[8], ARGV[9], ARGV[10]
local cap = tonumber(ARGV[12])
local aud = {ARGV[16], ARGV[17], ARGV[18], ARGV[19]}
local rkey = P .. 'r:' .. tenant .. ':' .. rid
if rid ~= '' then
  local earlier = redis.call('GET', rkey)
  if earlier then
    local rec = redis.call('GET', P .. 'b:' .. earlier)
    if rec then return {2, rec} end
  end
end
local tags = {}
for tag in string.gmatch(ARGV[11], '%S+') do table.insert(tags, tag) end

local function try(pk, cand, tried)
  if tried[cand] then return false end
  tried[cand] = true
  local h, z = xkeys(cand)
  if kind == 'axn' then
    if fits_axn(h, z) then return true end
    reclassify(pk, cand, h, z, cap)
    return false
  end
  local ok, full = fits_axb(h, z, a, b, cap)
  if full then reclassify(pk, cand, h, z, cap) end
  return ok
end

local function pick(pk, tried)
  local set = pk .. (kind == 'axn' and 'empty' or 'free')
  local one = redis.call('SRANDMEMBER', set)
  if not one then return nil end
  if try(pk, one, tried) then return one end
  for _, cand in ipairs(redis.call('SRANDMEMBER', set, 8)) do
    if try(pk, cand, tried) then return cand end
  end
  if redis.call('SCARD', set) > 8 then
    local cursor = '0'
    repeat
      local r = redis.call('SSCAN', set, cursor, 'COUNT', 100)
      cursor = r[1]
      for _, cand in ipairs(r[2]) do
        if try(pk, cand, tried) then return cand end
      end
    until cursor == '0'
  end
  return nil
end

local pk
local failure = nil
if x ~= '' then
  pk = P .. 'p:' .. tenant .. ':' .. tags[1] .. ':'
  local h, z = xkeys(x)
  local ok, full
  if kind == 'axn' then ok = fits_axn(h, z) else ok, full = fits_axb(h, z, a, b, cap) end
  if not ok then
    reclassify(pk, x, h, z, cap)
    failure = 'x_taken'
  end
else
  local which = kind == 'axn' and 'busy' or 'full'
  local tried = {}
  for _, tag in ipairs(tags) do
    pk = P .. 'p:' .. tenant .. ':' .. tag .. ':'
    x = pick(pk, tried)
    if x then break end
  end
  if not x then  -- before saying no: every number whose bindings expired by now is back
    for _, tag in ipairs(tags) do
      pk = P .. 'p:' .. tenant .. ':' .. tag .. ':'
      local moved = 0
      repeat moved = release(pk, cap, which, 1000) until moved < 1000
      x = pick(pk, {})
      if x then break end
    end
  end
  if not x then failure = 'no_free_x' end
end
if failure then
  audit(aud, '', {'t', ARGV[2], 'action', 'allocation_failed', 'tenant', tenant,
                  'key', ARGV[20], 'src', ARGV[21], 'rid', rid, 'id', '', 'reason', failure,
                  'before', '', 'after', '', 'request',
                  '{"x":"' .. ARGV[10] .. '",' .. string.sub(ARGV[14], 9)})
  return {0, failure}
end
local h, z = xkeys(x)
write_binding(h, z, kind, a, b, exp, ARGV[13])
classify_after_write(pk, x, z, kind, exp, cap)
local rec = '{"x":"' .. x .. '",' .. string.sub(ARGV[14], 9)
redis.call('SET', P .. 'b:' .. id, rec, 'PXAT', exp)
local ttl = ARGV[24]
index_add(P .. 'n:' .. tenant .. ':' .. a, exp, id, ttl)
if b ~= '' then index_add(P .. 'n:' .. tenant .. ':' .. b, exp, id, ttl) end
if ARGV[15] ~= '' then index_add(P .. 'o:' .. tenant .. ':' .. ARGV[15], exp, id, ttl) end
if rid ~= '' then redis.call('SET', rkey, id, 'PXAT', exp) end
audit(aud, id, {'t', ARGV[2], 'action', 'create', 'tenant', tenant, 'key', ARGV[20],
                'src', ARGV[21], 'rid', rid, 'id', id, 'reason', '', 'before', '', 'after', rec})
redis.call('PUBLISH', ARGV[22], ARGV[23] .. ' ' .. x)
return {1, rec}
"""

# ARGV: 1 prefix, 2 now_ms, 3 id, 4 the record as read (compare-and-set), 5 new record ('' to
# delete), 6 tenant, 7 kind, 8 x, 9 old a, 10 old b, 11 new a, 12 new b, 13 new exp_ms,
# 14 new optional fields, 15 area tag of x, 16 max_pairs_per_x, 17 order_id ('' none),
# 18-21 audit: stream, minid, max_entries, history ttl ms, 22 key id, 23 source address,
# 24 request id, 25 channel, 26 invalidation origin, 27 index key life (ms).
# Returns {1, record} done, {0, 'not_found'}, {0, 'retry'} (changed since read), {0, 'conflict'}
# (a new party already has a live binding on X).
CHANGE = _HELPERS + r"""
local id, old, new, tenant = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local kind, x, oa, ob, na, nb, exp = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12],
  ARGV[13]
local cap = tonumber(ARGV[16])
local aud = {ARGV[18], ARGV[19], ARGV[20], ARGV[21]}
local bkey = P .. 'b:' .. id
local cur = redis.call('GET', bkey)
if not cur then return {0, 'not_found'} end
if cur ~= old then return {0, 'retry'} end
local h, z = xkeys(x)
local pk = P .. 'p:' .. tenant .. ':' .. ARGV[15] .. ':'
collect(h, z, now, 64)
if new ~= '' and kind == 'axb' then
  for _, p in ipairs({na, nb}) do
    if p ~= oa and p ~= ob and live(redis.call('HGET', h, p)) then
      audit(aud, id, {'t', ARGV[2], 'action', 'update_failed', 'tenant', tenant,
                      'key', ARGV[22], 'src', ARGV[23], 'rid', ARGV[24], 'id', id,
                      'reason', 'conflict', 'before', cur, 'after', new})
      return {0, 'conflict'}
    end
  end
end
remove_binding(h, z, kind, oa, ob)
local action = 'delete'
if new ~= '' then
  action = 'update'
  if kind == 'axb' then
    for _, p in ipairs({na, nb}) do  -- an expired binding of a new party goes first
      local v = redis.call('HGET', h, p)
      if v then drop_axb(h, z, p, v) end
    end
  end
  write_binding(h, z, kind, na, nb, exp, ARGV[14])
  redis.call('SET', bkey, new, 'PXAT', exp)
else
  redis.call('DEL', bkey)
end
set_expiry(h, z)
reclassify(pk, x, h, z, cap)
for _, p in ipairs({oa, ob}) do
  if p ~= '' then redis.call('ZREM', P .. 'n:' .. tenant .. ':' .. p, id) end
end
local order = ARGV[17] ~= '' and (P .. 'o:' .. tenant .. ':' .. ARGV[17]) or nil
local ttl = ARGV[27]
if new ~= '' then
  index_add(P .. 'n:' .. tenant .. ':' .. na, exp, id, ttl)
  if nb ~= '' then index_add(P .. 'n:' .. tenant .. ':' .. nb, exp, id, ttl) end
  if order then index_add(order, exp, id, ttl) end
elseif order then
  redis.call('ZREM', order, id)
end
audit(aud, id, {'t', ARGV[2], 'action', action, 'tenant', tenant, 'key', ARGV[22],
                'src', ARGV[23], 'rid', ARGV[24], 'id', id, 'reason', '', 'before', cur,
                'after', new})
redis.call('PUBLISH', ARGV[25], ARGV[26] .. ' ' .. x)
return {1, new}
"""

# ARGV: 1 prefix, 2 now_ms, 3 tenant, 4 area tag, 5 digest, then the pool's numbers.
# Rebuilds the tenant's pool sets for one area when the configured pool changed (digest).
# Called in batches: the first call (5 = digest) starts a new build in a temporary set, the
# next calls add numbers, and the one with 5 = '=' + digest swaps the new sets in.
SYNC_POOL = r"""
local P, tenant, tag, step = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local pk = P .. 'p:' .. tenant .. ':' .. tag .. ':'
local tmp = pk .. 'build'
if string.sub(step, 1, 1) == '?' then
  return redis.call('GET', pk .. 'v') == string.sub(step, 2) and 1 or 0
end
if string.sub(step, 1, 1) == '=' then
  if redis.call('EXISTS', tmp) == 1 then
    redis.call('RENAME', tmp, pk .. 'free')
    redis.call('SUNIONSTORE', pk .. 'empty', pk .. 'free')
  else
    redis.call('DEL', pk .. 'free', pk .. 'empty')
  end
  redis.call('DEL', pk .. 'full', pk .. 'busy')
  redis.call('SET', pk .. 'v', string.sub(step, 2))
  return 1
end
if step == '+' then
  for i = 6, #ARGV do redis.call('SADD', tmp, ARGV[i]) end
  return 1
end
redis.call('DEL', tmp)
return 1
"""
