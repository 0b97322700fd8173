"""The policy's counters in Redis: one Lua script per call checks and updates them atomically.

- rate limits: a list per (rule, subject) of the times (ms) of the last `max_calls` calls let
  through, newest first: a call is refused while the oldest of them is still in the window. A
  sliding window, exact, at two commands a check and one or two an update (a sorted set of
  every call in the window took four, and more memory).
- concurrency: a sorted set per (rule, subject) of the calls holding a place, scored by the
  end of their lease; a call's hold key lists the sets it is in. The worker that let the call
  through refreshes the lease of its answered calls every lease/3; the end of the call (its
  final response >= 300, or a BYE on any instance) releases it. A call whose instance died
  drops out when its lease runs out: the count heals itself.
- bulk calling: a sorted set per caller of the distinct callees reached, scored by time.

Every check happens before any update: a refused call counts nowhere. Keys named in the hold
list are read by the release script; this layout assumes one Redis (or Sentinel), not Cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.bindings.redis_lookup import LookupReplyError
from proxy.policy.engine import CallFacts, CounterPlan

CHECK = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local lease = tonumber(ARGV[3])
local nr, nc, nb = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local a = 7
for i = 1, nr do
  local key, max, win = KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local nth = redis.call('LINDEX', key, max - 1)
  if nth and now - tonumber(nth) < win then return {'rate', i} end
end
for i = 1, nc do
  local key, max = KEYS[nr + i], tonumber(ARGV[a])
  a = a + 1
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= max then return {'conc', i} end
end
local callee = ARGV[a + 2]
if nb == 1 then
  local key, max, win = KEYS[nr + nc + 1], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
  if not redis.call('ZSCORE', key, callee) and redis.call('ZCARD', key) >= max then
    return {'bulk', 1}
  end
end
a = 7
for i = 1, nr do
  local key, max, win = KEYS[i], tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  if redis.call('LPUSH', key, now) > max then redis.call('LTRIM', key, 0, max - 1) end
  redis.call('PEXPIRE', key, win)
end
local held = {}
for i = 1, nc do
  local key = KEYS[nr + i]
  a = a + 1
  redis.call('ZADD', key, now + lease, member)
  redis.call('PEXPIRE', key, lease * 2)
  held[#held + 1] = key
end
if nc > 0 then
  redis.call('SET', KEYS[nr + nc + nb + 1], table.concat(held, '\\n'), 'PX', lease)
end
if nb == 1 then
  local key, win = KEYS[nr + nc + 1], tonumber(ARGV[a + 1])
  redis.call('ZADD', key, now, callee)
  redis.call('PEXPIRE', key, win)
end
return {'ok', 0}
"""

# KEYS[1]: the call's hold key; ARGV[1]: the call's member
RELEASE = """
local held = redis.call('GET', KEYS[1])
if not held then return 0 end
for key in string.gmatch(held, '[^\\n]+') do redis.call('ZREM', key, ARGV[1]) end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: hold keys; ARGV[1]: the new lease end (ms), ARGV[2]: lease (ms), ARGV[2 + i]: members.
# Returns the (1-based) indexes of calls no longer held (released elsewhere, or expired).
REFRESH = """
local expiry, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local gone = {}
for i, hold in ipairs(KEYS) do
  local held = redis.call('GET', hold)
  if not held then
    gone[#gone + 1] = i
  else
    redis.call('PEXPIRE', hold, lease)
    for key in string.gmatch(held, '[^\\n]+') do
      redis.call('ZADD', key, 'XX', expiry, ARGV[2 + i])
      redis.call('PEXPIRE', key, lease * 2)
    end
  end
end
return gone
"""


class RedisCounters:
    """The three scripts on one client (str or bytes replies both work)."""

    def __init__(self, client: Any, hold_prefix: str, lease_ms: int, *, lean: Any = None,
                 timeout_s: float | None = None) -> None:
        self.client = client
        self.hold_prefix = hold_prefix  # <key_prefix>h:
        self.lease_ms = lease_ms
        # the per-call scripts (check, release) go over the store's lean pipelined connection
        # when there is one (proxy/bindings/redis_lookup.py: redis-py costs ~250 µs of Python
        # a command); redis-py loads a script Redis does not know and does everything else
        self.lean = lean
        self.timeout_s = timeout_s
        self._check = client.register_script(CHECK)
        self._release = client.register_script(RELEASE)
        self._refresh = client.register_script(REFRESH)

    async def _eval(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        if self.lean is not None and script.sha:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self.lean.call("EVALSHA", script.sha, len(keys), *keys, *args)
            except LookupReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        return await script(keys=keys, args=args)

    def _check_args(self, plan: CounterPlan, facts: CallFacts, now_ms: int
                    ) -> tuple[list[str], list[Any]]:
        keys: list[str] = [c.key for c in plan.rates]
        keys += [c.key for c in plan.concurrency]
        args: list[Any] = [now_ms, facts.call_key, self.lease_ms, len(plan.rates),
                           len(plan.concurrency), 1 if plan.bulk is not None else 0]
        for c in plan.rates:
            args += [c.limit, c.window_ms]
        for c in plan.concurrency:
            args.append(c.limit)
        if plan.bulk is not None:
            keys.append(plan.bulk.key)
            args += [plan.bulk.limit, plan.bulk.window_ms]
        else:
            args += [0, 0]
        args.append(plan.callee)
        keys.append(self.hold_prefix + facts.call_key)
        return keys, args

    async def check(self, plan: CounterPlan, facts: CallFacts, now_ms: int) -> Any:
        keys, args = self._check_args(plan, facts, now_ms)
        return await self._eval(self._check, keys, args)

    async def check_many(self, calls: list[tuple[CounterPlan, CallFacts]], now_ms: int
                         ) -> list[Any]:
        """One script run per call, all in one write: each call's reply, or its exception in
        its place (one call's script error is not the others')."""
        sha = self._check.sha
        if self.lean is None or not sha or len(calls) == 1:
            replies: list[Any] = []
            for plan, facts in calls:
                try:
                    replies.append(await self.check(plan, facts, now_ms))
                except Exception as exc:
                    replies.append(exc)
            return replies
        commands = []
        for plan, facts in calls:
            keys, args = self._check_args(plan, facts, now_ms)
            commands.append(("EVALSHA", sha, len(keys), *keys, *args))
        async with asyncio.timeout(self.timeout_s):
            replies = await self.lean.call_each(commands)
        for i, reply in enumerate(replies):
            # Redis restarted or flushed its scripts: those calls again, through redis-py
            # (which loads the script); the calls whose script ran are not counted twice
            if isinstance(reply, LookupReplyError) and str(reply).startswith("NOSCRIPT"):
                plan, facts = calls[i]
                try:
                    replies[i] = await self.check(plan, facts, now_ms)
                except Exception as exc:
                    replies[i] = exc
        return replies

    def send_checks(self, calls: list[tuple[CounterPlan, CallFacts]], now_ms: int,
                    done: Any) -> bool:
        """`check_many` without a task: the scripts go out in one write now and `done(replies)`
        runs as the last reply is read (each reply, or its LookupReplyError, in its call's
        place), `done(exception)` on a lost connection or a time-out. False, nothing sent, when
        there is no lean connection up or no script hash: use `check_many`."""
        sha = self._check.sha
        lean = self.lean
        if lean is None or not sha:
            return False
        commands = []
        for plan, facts in calls:
            keys, args = self._check_args(plan, facts, now_ms)
            commands.append(("EVALSHA", sha, len(keys), *keys, *args))
        return lean.send_each(commands, done, self.timeout_s)

    async def release(self, members: list[str]) -> None:
        """Give back the places of ended calls (idempotent: a released call holds none)."""
        if len(members) == 1:
            await self._eval(self._release, [self.hold_prefix + members[0]], [members[0]])
            return
        sha = self._release.sha
        if self.lean is not None and sha:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.lean.call_many(
                        [("EVALSHA", sha, 1, self.hold_prefix + m, m) for m in members])
                return
            except LookupReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
        async with self.client.pipeline(transaction=False) as pipe:
            for m in members:
                await self._release(keys=[self.hold_prefix + m], args=[m], client=pipe)
            await pipe.execute()

    async def refresh(self, members: list[str], now_ms: int) -> list[str]:
        """Extend the leases of `members`; returns those no longer held anywhere."""
        if not members:
            return []
        gone = await self._refresh(keys=[self.hold_prefix + m for m in members],
                                   args=[now_ms + self.lease_ms, self.lease_ms, *members])
        return [members[int(i) - 1] for i in gone]
