//! The Lua scripts: every state change of a package is one atomic script, so a package is always
//! in exactly one of ready, delayed, in flight, dead (or gone).
//!
//! A package travels as one string, its *blob*: `id:deliveries:priority:payload`, where
//! `deliveries` counts its deliveries before this stay in the queue. Keys of a queue (all share
//! the hash tag `{queue}`, so they live in one cluster slot):
//! - `ready:<priority>` (LIST of blobs, FIFO) and `bands` (ZSET of the priorities that may have a
//!   list, score = -priority): a dequeue pops the highest band first;
//! - `delayed` (ZSET blob → due ms);
//! - `inflight:<batch>` (LIST of the blobs one dequeue handed out), `acked:<batch>` (SET of the
//!   answered indexes, an intset) and `leases` (ZSET batch → lease deadline ms): a claim of 100
//!   is one `RPUSH` and one lease, an acknowledgement one `SADD`; the batch goes when all its
//!   packages are answered. The receipt is `batch:index:id`; a stale receipt (an earlier
//!   delivery) names a batch that is gone;
//! - `seq` (counter of ids, never deleted; batch ids come from the client: a random prefix per
//!   handle and a counter, never reused), `signal` (LIST that wakes blocked
//!   consumers), `dead` (ZSET id → ms), `deadinfo` (HASH id → `P<priority>|deliveries|ms|reason`;
//!   written before version 3 without the `P<priority>|` part, read as priority 0),
//!   `deaddata` (HASH id → payload).
//!
//! The scripts do no per-package string work on the hot path (that is what made Lua the cost):
//! the client reads the headers. Times come from the server's clock (`TIME`). Band lists and
//! batch hashes are derived from base keys passed in `KEYS`; they share its hash tag, so they
//! are in the same slot.

/// Shared helpers: the server clock, pushing a blob to its band, counting one more delivery in
/// a header, and dropping a batch's lease once all its packages are answered.
const PRELUDE: &str = r#"
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function push(base, bands, blob, front)
  local p = string.match(blob, '^%d+:%d+:(%-?%d+):') or '0'
  if front then redis.call('LPUSH', base .. p, blob) else redis.call('RPUSH', base .. p, blob) end
  redis.call('ZADD', bands, -tonumber(p), p)
end
local function bump(blob)
  local id, n, p, at = string.match(blob, '^(%d+):(%d+):(%-?%d+):()')
  if not id then return blob end
  return id .. ':' .. (tonumber(n) + 1) .. ':' .. p .. ':' .. string.sub(blob, at)
end
-- The answered indexes of a batch, as a lookup table.
local function answers(key)
  local t = {}
  for _, x in ipairs(redis.call('SMEMBERS', key)) do t[tonumber(x)] = true end
  return t
end
-- Drops a batch and its lease once every package of it is answered.
local function settle(inflight, acked, leases, b, len)
  if redis.call('SCARD', acked .. b) >= len then
    redis.call('UNLINK', inflight .. b, acked .. b)
    redis.call('ZREM', leases, b)
  end
end
-- Answers one package of a batch and returns its blob; nil for a stale or answered receipt, or
-- one whose id is not the package's (id 0: a foreign value, which has none).
local function take(inflight, acked, leases, b, i, id)
  local n = tonumber(i)
  if not n or n < 1 or redis.call('SISMEMBER', acked .. b, i) == 1 then return nil end
  local blob = redis.call('LINDEX', inflight .. b, n - 1)
  if not blob then return nil end
  if id ~= '0' and string.sub(blob, 1, #id + 1) ~= id .. ':' then return nil end
  redis.call('SADD', acked .. b, i)
  settle(inflight, acked, leases, b, redis.call('LLEN', inflight .. b))
  return blob
end
"#;

/// KEYS: seq, ready base, bands, delayed, signal, token. ARGV: (payload, priority, delay_ms)*.
/// Returns the first id; the batch got consecutive ids. The token (one per call, kept a minute)
/// makes a re-sent call (the cluster client re-sends after a dropped connection) store nothing
/// twice: it answers the first call's id.
pub fn enqueue() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local k = #ARGV / 3
local seen = redis.call('GET', KEYS[6])
if seen then return tonumber(seen) end
local first = redis.call('INCRBY', KEYS[1], k) - k + 1
redis.call('SET', KEYS[6], string.format('%d', first), 'PX', 60000)
local lists, order, now = {}, {}, nil
for i = 0, k - 1 do
  local p, delay = ARGV[3 * i + 2], tonumber(ARGV[3 * i + 3])
  local blob = string.format('%d', first + i) .. ':0:' .. p .. ':' .. ARGV[3 * i + 1]
  if delay > 0 then
    now = now or clock()
    redis.call('ZADD', KEYS[4], string.format('%d', now + delay), blob)
  else
    if not lists[p] then lists[p] = {}; order[#order + 1] = p end
    local l = lists[p]
    l[#l + 1] = blob
  end
end
for _, p in ipairs(order) do
  redis.call('RPUSH', KEYS[2] .. p, unpack(lists[p]))
  redis.call('ZADD', KEYS[3], -tonumber(p), p)
end
redis.call('LPUSH', KEYS[5], 1)
redis.call('LTRIM', KEYS[5], 0, 63)
return first
"#
    )
}

/// KEYS: ready base, bands, delayed, inflight base, acked base, leases. ARGV: bulk,
/// retry_ms, reliable (1/0), batch (a new id of the client's, in reliable mode).
///
/// First brings back what is due: unanswered packages of expired leases (to the front of their
/// band, one delivery more in their header) and delayed ones (to the back). Then takes up to
/// `bulk` blobs, highest band first.
///
/// Reliable mode moves them to the batch list under one lease without handling a single blob in
/// Lua: `SORT … BY nosort LIMIT 0 n STORE` copies the head of a list in C and `LTRIM` drops it
/// (only a second band in the same claim goes through Lua). It returns `{count, {}}`; the
/// client reads the batch with an `LRANGE` in the same pipeline. Fast mode pops and returns
/// `{0, {blob...}}`.
pub fn dequeue() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local now = clock()
local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 20)
for _, b in ipairs(expired) do
  local answered = answers(KEYS[5] .. b)
  local blobs = redis.call('LRANGE', KEYS[4] .. b, 0, -1)
  for i = #blobs, 1, -1 do
    if not answered[i] then push(KEYS[1], KEYS[2], bump(blobs[i]), true) end
  end
  redis.call('UNLINK', KEYS[4] .. b, KEYS[5] .. b)
end
if #expired > 0 then redis.call('ZREM', KEYS[6], unpack(expired)) end
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  for _, blob in ipairs(due) do push(KEYS[1], KEYS[2], blob, false) end
  redis.call('ZREM', KEYS[3], unpack(due))
end
local want = tonumber(ARGV[1])
if ARGV[3] == '1' then
  local dest = KEYS[4] .. ARGV[4]
  local n = 0
  while want > 0 do
    local top = redis.call('ZRANGE', KEYS[2], 0, 0)
    if #top == 0 then break end
    local key = KEYS[1] .. top[1]
    local c
    if n == 0 then
      c = redis.call('SORT', key, 'BY', 'nosort', 'LIMIT', 0, want, 'STORE', dest)
    else
      local got = redis.call('LRANGE', key, 0, want - 1)
      c = #got
      if c > 0 then redis.call('RPUSH', dest, unpack(got)) end
    end
    if c > 0 then redis.call('LTRIM', key, c, -1) end
    -- Fewer than asked: the list is empty now, and so is the band.
    if c < want then redis.call('ZREM', KEYS[2], top[1]) end
    n = n + c
    want = want - c
  end
  if n > 0 then
    redis.call('ZADD', KEYS[6], string.format('%d', now + tonumber(ARGV[2])), ARGV[4])
  end
  return {n, {}}
end
local out
while want > 0 do
  local top = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #top == 0 then break end
  local got = redis.call('LPOP', KEYS[1] .. top[1], want)
  if got then
    if out then
      for _, blob in ipairs(got) do out[#out + 1] = blob end
    else
      out = got
    end
    if #got < want then redis.call('ZREM', KEYS[2], top[1]) end
    want = want - #got
  else
    redis.call('ZREM', KEYS[2], top[1])
  end
end
return {0, out or {}}
"#
    )
}

/// KEYS: inflight base, acked base, leases. ARGV: (batch, count, token × count)*, a token
/// being an index `i` or a range `i-j`. Returns how many were answered now; a receipt that no
/// longer holds its lease names a batch that is gone. A whole untouched batch (`1-len`), the
/// usual case, is dropped without per-package work.
pub fn acknowledge() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local i, total = 1, 0
while i <= #ARGV do
  local b, k = ARGV[i], tonumber(ARGV[i + 1])
  local len = redis.call('LLEN', KEYS[1] .. b)
  if len > 0 then
    if k == 1 and ARGV[i + 2] == '1-' .. len and redis.call('EXISTS', KEYS[2] .. b) == 0 then
      redis.call('UNLINK', KEYS[1] .. b)
      redis.call('ZREM', KEYS[3], b)
      total = total + len
    else
      local ok = {}
      for j = i + 2, i + 1 + k do
        local lo, hi = string.match(ARGV[j], '^(%d+)%-(%d+)$')
        if lo then
          for x = math.max(tonumber(lo), 1), math.min(tonumber(hi), len) do ok[#ok + 1] = x end
        else
          local x = tonumber(ARGV[j])
          if x and x >= 1 and x <= len then ok[#ok + 1] = ARGV[j] end
        end
      end
      if #ok > 0 then
        total = total + redis.call('SADD', KEYS[2] .. b, unpack(ok))
        settle(KEYS[1], KEYS[2], KEYS[3], b, len)
      end
    end
  end
  i = i + 2 + k
end
return total
"#
    )
}

/// KEYS: ready base, bands, delayed, inflight base, acked base, leases, signal. ARGV: batch,
/// index, delay_ms, id. Back to the front of its band (or to `delayed`), one delivery more in its
/// header.
pub fn fail() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local blob = take(KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[4])
if not blob then return 0 end
blob = bump(blob)
local delay = tonumber(ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[3], string.format('%d', clock() + delay), blob)
else
  push(KEYS[1], KEYS[2], blob, true)
  redis.call('LPUSH', KEYS[7], 1)
  redis.call('LTRIM', KEYS[7], 0, 63)
end
return 1
"#
    )
}

/// KEYS: inflight base, acked base, leases. ARGV: batch, index, by_ms, id. If the receipt still
/// holds (its batch is leased, the index unanswered, the id its package's), the batch's lease
/// runs out `by_ms` from now, or later if another package of the batch already holds it longer
/// (`GT`: a lease shared by a batch is never shortened), and the script returns 1. A stale
/// receipt changes nothing and returns 0.
pub fn extend() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local n = tonumber(ARGV[2])
if not n or n < 1 or redis.call('SISMEMBER', KEYS[2] .. ARGV[1], ARGV[2]) == 1 then return 0 end
local blob = redis.call('LINDEX', KEYS[1] .. ARGV[1], n - 1)
if not blob then return 0 end
if ARGV[4] ~= '0' and string.sub(blob, 1, #ARGV[4] + 1) ~= ARGV[4] .. ':' then return 0 end
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[3], 'XX', 'GT', string.format('%d', clock() + tonumber(ARGV[3])), ARGV[1])
return 1
"#
    )
}

/// KEYS: inflight base, acked base, leases, dead, deadinfo, deaddata, seq. ARGV: batch, index,
/// reason, id. A blob without a header (not written by qcluster) is kept whole under a new name.
pub fn dead_letter() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local blob = take(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[4])
if not blob then return 0 end
local id, n, p, at = string.match(blob, '^(%d+):(%d+):(%-?%d+):()')
local payload = blob
if id then
  payload = string.sub(blob, at)
  n = tonumber(n) + 1
else
  id = 'malformed-' .. string.format('%d', redis.call('INCR', KEYS[7]))
  n = 1
  p = '0'
end
local now = string.format('%d', clock())
redis.call('HSET', KEYS[6], id, payload)
redis.call('HSET', KEYS[5], id, 'P' .. p .. '|' .. n .. '|' .. now .. '|' .. ARGV[3])
redis.call('ZADD', KEYS[4], now, id)
return 1
"#
    )
}

/// KEYS: seq, ready base, bands, signal, dead, deadinfo, deaddata. ARGV: id (as `dead` lists
/// it). Puts dead letter `id` back at the end of its priority's band as a fresh package (a new
/// id, no delivery yet) and removes it from `dead`, `deadinfo` and
/// `deaddata`, in one step. Returns 1, or 0 when there is no such dead letter.
pub fn requeue_dead() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
if not redis.call('ZSCORE', KEYS[5], ARGV[1]) then return 0 end
local payload = redis.call('HGET', KEYS[7], ARGV[1]) or ''
local info = redis.call('HGET', KEYS[6], ARGV[1]) or ''
local p = string.match(info, '^P(%-?%d+)|') or '0'
local id = redis.call('INCR', KEYS[1])
push(KEYS[2], KEYS[3], string.format('%d', id) .. ':0:' .. p .. ':' .. payload, false)
redis.call('LPUSH', KEYS[4], 1)
redis.call('LTRIM', KEYS[4], 0, 63)
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
return 1
"#
    )
}

/// KEYS: dead, deadinfo, deaddata. ARGV: id. Removes dead letter `id` for good; returns 1, or 0
/// when there is no such dead letter.
pub const DELETE_DEAD: &str = r#"
local n = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return n
"#;

/// KEYS: ready base, bands, delayed, inflight base, acked base, leases. ARGV: batch, index, id.
///
/// Removes the package whatever its lease. With the current receipt that is one step; a stale
/// one (the package was delivered again or put back) means a search by id through what is in
/// flight, delayed and ready: O(n), but only on that rare path.
pub fn delete() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
if take(KEYS[4], KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3]) then return 1 end
local head = ARGV[3] .. ':'
local function mine(blob) return string.sub(blob, 1, #head) == head end
for _, b in ipairs(redis.call('ZRANGE', KEYS[6], 0, -1)) do
  local answered = answers(KEYS[5] .. b)
  for i, blob in ipairs(redis.call('LRANGE', KEYS[4] .. b, 0, -1)) do
    if not answered[i] and mine(blob) then
      take(KEYS[4], KEYS[5], KEYS[6], b, tostring(i), '0')
      return 1
    end
  end
end
local cursor = '0'
repeat
  local r = redis.call('ZSCAN', KEYS[3], cursor, 'MATCH', head .. '*', 'COUNT', 1000)
  cursor = r[1]
  for i = 1, #r[2], 2 do return redis.call('ZREM', KEYS[3], r[2][i]) end
until cursor == '0'
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key = KEYS[1] .. p
  local len = redis.call('LLEN', key)
  for s = 0, len - 1, 1000 do
    for _, blob in ipairs(redis.call('LRANGE', key, s, s + 999)) do
      if mine(blob) then return redis.call('LREM', key, 1, blob) end
    end
  end
end
return 0
"#
    )
}

/// KEYS: inflight base, acked base, leases. Packages in flight (delivered, not answered).
pub const LOCKED: &str = r#"
local n = 0
for _, b in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  n = n + redis.call('LLEN', KEYS[1] .. b) - redis.call('SCARD', KEYS[2] .. b)
end
return n
"#;

/// KEYS: inflight base, acked base, ready base, leases, bands, delayed, then the queue's other
/// keys. Removes the queue and everything in it, in one step (a purge and a drop in two would
/// let a concurrent enqueue leave a band list no one can see).
pub const DROP: &str = r#"
for _, b in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  redis.call('UNLINK', KEYS[1] .. b, KEYS[2] .. b)
end
for _, p in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  redis.call('UNLINK', KEYS[3] .. p)
end
return redis.call('UNLINK', unpack(KEYS, 4))
"#;

/// KEYS: ready base, bands, delayed. Removes what waits (not what is in flight) and returns
/// how many. `UNLINK` frees big lists off the main thread, so Redis is not blocked.
pub const PURGE: &str = r#"
local n = 0
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  n = n + redis.call('LLEN', KEYS[1] .. p)
  redis.call('UNLINK', KEYS[1] .. p)
end
n = n + redis.call('ZCARD', KEYS[3])
redis.call('UNLINK', KEYS[2], KEYS[3])
return n
"#;

/// KEYS: ready base, bands, delayed. Packages waiting, delayed included.
pub const SIZE: &str = r#"
local n = redis.call('ZCARD', KEYS[3])
for _, p in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  n = n + redis.call('LLEN', KEYS[1] .. p)
end
return n
"#;

/// KEYS: stat key, index. ARGV: value, ttl_ms, name. The value expires by itself; the index
/// (name → expiry) lets `get_stats` find the live ones without `SCAN`, which a Redis Cluster
/// would need on every node.
pub const SET_STAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return 1
"#;

/// KEYS: index. ARGV: stat key base, name prefix. Returns `{name, value}*` of the live ones.
pub const GET_STATS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  if string.sub(m, 1, #ARGV[2]) == ARGV[2] then
    local v = redis.call('GET', ARGV[1] .. m)
    if v then out[#out + 1] = m; out[#out + 1] = v end
  end
end
return out
"#;
