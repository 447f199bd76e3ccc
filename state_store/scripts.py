"""Server-side Lua: the per-user compare-and-set, atomic because one script runs at a time."""

from __future__ import annotations

import hashlib

# KEYS: state hash, dedup zset.
# ARGV: expected ver, blob, now ms, ttl ms (0 = none), dedup window, events in this write,
#       last ts ('' = none), write token, event ids...
# Returns {status, version}:
#   1 committed at version | 2 this token already committed (a re-sent write) | 0 version moved on
#  -1 an event id is already applied | -2 the stored version is not an integer.
CAS = """
local cur = redis.call('HGET', KEYS[1], 'ver')
local ver = 0
if cur then
  ver = tonumber(cur)
  if not ver then return {-2, 0} end
end
if redis.call('HGET', KEYS[1], 'tok') == ARGV[8] then return {2, ver} end
if ver ~= tonumber(ARGV[1]) then return {0, ver} end
for i = 9, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then return {-1, ver} end
end
local nv = ver + 1
redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'ver', nv, 'ts', ARGV[3], 'tok', ARGV[8])
redis.call('HINCRBY', KEYS[1], 'n', tonumber(ARGV[6]))
if ARGV[7] ~= '' then
  local old = tonumber(redis.call('HGET', KEYS[1], 'lts') or '')
  if (not old) or tonumber(ARGV[7]) > old then redis.call('HSET', KEYS[1], 'lts', ARGV[7]) end
end
local window = tonumber(ARGV[5])
if window > 0 and #ARGV >= 9 then
  for i = 9, #ARGV, 256 do
    local args = {}
    for j = i, math.min(i + 255, #ARGV) do
      args[#args + 1] = nv
      args[#args + 1] = ARGV[j]
    end
    redis.call('ZADD', KEYS[2], unpack(args))
  end
  local over = redis.call('ZCARD', KEYS[2]) - window
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) end
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1, nv}
"""

CAS_SHA = hashlib.sha1(CAS.encode()).hexdigest()

COMMITTED, REPLAYED, CONFLICT, DUPLICATE, MALFORMED = 1, 2, 0, -1, -2
