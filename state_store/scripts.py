"""Server-side Lua: the per-user compare-and-set, atomic because one script runs at a time."""

from __future__ import annotations

import hashlib

# KEYS: state hash, dedup zset, the user's set of model versions holding state (for erasure), the erasure hash
#       of the user's slot (field: the user id), the user's contention lock, and (only when the write logs
#       events) the log stream.
# ARGV: expected ver, blob, now ms, ttl ms (0 = none), dedup window, events in this write ('=N': set the
#       count to N instead of adding), last ts ('' = none), write token, model version, M (stream marks),
#       L (events to log), log MAXLEN (0 = no trimming), M triples (mark field, entry id 'ms-seq', fencing
#       epoch), L log entries (F, then F field/value pairs each), event ids...
# A stream mark field holds '<entry id> <epoch>': the last stream entry applied to the user from one partition
# and the lease epoch of the consumer that wrote it (docs/streams.md).
# The erasure hash holds the entry id of the user's erasure (streams/erasure.py): a write that moves a mark to
# an entry at or below it applies events from before the erasure, and is refused, so a write racing a DELETE
# cannot bring the user back. The logged events are XADDed (with MAXLEN ~) in the same script as the state, so
# the event log holds exactly the events committed (docs/lifecycle.md).
# Returns {status, version, logged entry ids...}:
#   1 committed at version | 2 this token already committed (a re-sent write) | 0 version moved on
#  -1 an event id is already applied | -2 the stored version is not an integer
#  -3 fenced: a consumer holding a newer lease of the partition already wrote the user's mark
#  -4 the write would not move a stream mark forward (a caller bug: nothing is written); a replacing write
#     ('=N', a backfill) may rewrite the state at the stored mark, never below it.
#  -5 erased: the write's stream mark is at or below the user's erasure tombstone (nothing is written)
# The contention lock (a plain key, set with SET NX PX by a writer that already lost a race for the user,
# holding its attempt's token prefix): while another writer holds it, a write answers 0 as if the version had
# moved on; the holder's commit deletes it. Locks only decide who goes next (liveness): safety is the version.
CAS = """
local cur = redis.call('HMGET', KEYS[1], 'ver', 'tok', 'n', 'lts')
local ver = 0
if cur[1] then
  ver = tonumber(cur[1])
  if not ver then return {-2, 0} end
end
if cur[2] == ARGV[8] then return {2, ver} end
local lk = redis.call('GET', KEYS[5])
if lk and string.sub(ARGV[8], 1, #lk) ~= lk then return {0, ver} end
if ver ~= tonumber(ARGV[1]) then return {0, ver} end
local nm = tonumber(ARGV[10])
local nl = tonumber(ARGV[11])
local replace = string.sub(ARGV[6], 1, 1) == '='
local m0 = 13
local l0 = m0 + 3 * nm
local e0 = l0
for _ = 1, nl do e0 = e0 + 1 + 2 * tonumber(ARGV[e0]) end
local function entry(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
if nm > 0 then
  local stone = redis.call('HGET', KEYS[4], string.match(KEYS[1], '{u:(.*)}:s$'))
  if stone then
    local sms, sseq = entry(stone)
    for i = m0, l0 - 1, 3 do
      local ms, seq = entry(ARGV[i + 1])
      if ms < sms or (ms == sms and seq <= sseq) then return {-5, ver} end
    end
  end
end
for i = m0, l0 - 1, 3 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local sp = string.find(old, ' ', 1, true)
    if tonumber(string.sub(old, sp + 1)) > tonumber(ARGV[i + 2]) then return {-3, ver} end
    local oms, oseq = entry(string.sub(old, 1, sp - 1))
    local nms, nseq = entry(ARGV[i + 1])
    if nms < oms or (nms == oms and (nseq < oseq or (nseq == oseq and not replace))) then return {-4, ver} end
  end
end
local window = tonumber(ARGV[5])
if window > 0 then
  for i = e0, #ARGV do
    if redis.call('ZSCORE', KEYS[2], ARGV[i]) then return {-1, ver} end
  end
end
local nv = ver + 1
local lts = cur[4]
local n
if string.sub(ARGV[6], 1, 1) == '=' then
  n = tonumber(string.sub(ARGV[6], 2))
  if ARGV[7] ~= '' then lts = ARGV[7] end
else
  n = (tonumber(cur[3]) or 0) + tonumber(ARGV[6])
  if ARGV[7] ~= '' and ((not lts) or (tonumber(lts) or -math.huge) < tonumber(ARGV[7])) then lts = ARGV[7] end
end
if lts then
  redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'ver', nv, 'ts', ARGV[3], 'tok', ARGV[8], 'n', n, 'lts', lts)
else
  redis.call('HSET', KEYS[1], 'blob', ARGV[2], 'ver', nv, 'ts', ARGV[3], 'tok', ARGV[8], 'n', n)
end
for i = m0, l0 - 1, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[i + 2])
end
redis.call('SADD', KEYS[3], ARGV[9])
if lk then redis.call('DEL', KEYS[5]) end
if window > 0 and #ARGV >= e0 then
  -- trim first, so a set kept within zset-max-listpack-entries stays in the compact encoding
  local first = math.max(e0, #ARGV - window + 1)
  local over = redis.call('ZCARD', KEYS[2]) + (#ARGV - first + 1) - window
  if over > 0 then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1) end
  for i = first, #ARGV, 256 do
    local args = {}
    for j = i, math.min(i + 255, #ARGV) do
      args[#args + 1] = nv
      args[#args + 1] = ARGV[j]
    end
    redis.call('ZADD', KEYS[2], unpack(args))
  end
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
local out = {1, nv}
local j = l0
for _ = 1, nl do
  local nf = tonumber(ARGV[j])
  local args = {KEYS[6]}
  if tonumber(ARGV[12]) > 0 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = ARGV[12]
  end
  args[#args + 1] = '*'
  for k = j + 1, j + 2 * nf do args[#args + 1] = ARGV[k] end
  out[#out + 1] = redis.call('XADD', unpack(args))
  j = j + 1 + 2 * nf
end
return out
"""

CAS_SHA = hashlib.sha1(CAS.encode()).hexdigest()

# The read of a user whose events carry ids: the state fields and which ids are already applied, in one
# command (HMGET + ZMSCORE would be two per user, and the client's per-command cost dominates the read).
# KEYS: state hash, dedup zset. ARGV: number of fields, fields..., event ids...
# Returns {fields (nil where absent), flags (1 = already applied, 0 = not), one per event id}.
READ = """
local nf = tonumber(ARGV[1])
local row = redis.call('HMGET', KEYS[1], unpack(ARGV, 2, nf + 1))
local flags = {}
for i = nf + 2, #ARGV do
  flags[#flags + 1] = redis.call('ZSCORE', KEYS[2], ARGV[i]) and 1 or 0
end
return {row, flags}
"""

READ_SHA = hashlib.sha1(READ.encode()).hexdigest()

# Releases a contention lock still held by this token prefix (its holder's write did not commit).
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

COMMITTED, REPLAYED, CONFLICT, DUPLICATE, MALFORMED, FENCED, MARK_BEHIND, ERASED = 1, 2, 0, -1, -2, -3, -4, -5
