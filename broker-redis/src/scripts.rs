//! The Lua scripts: every state change of a package is one atomic script, so a package is always
//! in exactly one of ready, delayed, in flight (or gone).
//!
//! Keys of a queue (all share the hash tag `{queue}` so that they live in one cluster slot):
//! `ready` (ZSET, score = priority band + sequence), `delayed` (ZSET, score = due ms),
//! `inflight` (ZSET, score = lease deadline ms), `data` (HASH id → payload), `score`
//! (HASH id → ready score), `dlv` (HASH id → deliveries), `seq` (counter), `signal` (LIST, wakes
//! blocked consumers), `dead` (ZSET id → time), `deadinfo` (HASH id → "deliveries|ms|reason"),
//! `deaddata` (HASH id → payload). Times come from the server's clock (`TIME`).

/// Shared preamble: the server clock in ms and the receipt check.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function holds(inflight, dlv, id, n)
  return redis.call('ZSCORE', inflight, id) and redis.call('HGET', dlv, id) == n
end
"#;

/// KEYS: seq, data, score, ready, delayed, signal. ARGV: (payload, priority, delay_ms)*.
pub const ENQUEUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = {}
for i = 1, #ARGV, 3 do
  local id = redis.call('INCR', KEYS[1])
  local score = (32767 - tonumber(ARGV[i + 1])) * 68719476736 + id
  redis.call('HSET', KEYS[2], id, ARGV[i])
  redis.call('HSET', KEYS[3], id, score)
  local delay = tonumber(ARGV[i + 2])
  if delay > 0 then
    redis.call('ZADD', KEYS[5], now + delay, id)
  else
    redis.call('ZADD', KEYS[4], score, id)
  end
  ids[#ids + 1] = id
end
redis.call('LPUSH', KEYS[6], 1)
redis.call('LTRIM', KEYS[6], 0, 63)
return ids
"#;

/// KEYS: ready, delayed, inflight, data, score, dlv. ARGV: bulk, retry_ms, reliable (1/0).
/// Returns {id, deliveries, payload} per package. Variadic commands throughout: a claim of 100
/// is a handful of calls, not hundreds.
pub fn dequeue() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local function back(from)
  local ids = redis.call('ZRANGEBYSCORE', from, '-inf', now, 'LIMIT', 0, 1000)
  if #ids == 0 then return end
  redis.call('ZREM', from, unpack(ids))
  local scores = redis.call('HMGET', KEYS[5], unpack(ids))
  local args = {}
  for i, id in ipairs(ids) do
    -- A missing score (edited by hand, evicted) falls back to priority 0 in id order.
    args[#args + 1] = scores[i] or (32767 * 68719476736 + tonumber(id)); args[#args + 1] = id
  end
  if #args > 0 then redis.call('ZADD', KEYS[1], unpack(args)) end
end
back(KEYS[3])
back(KEYS[2])
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
if #popped == 0 then return {} end
local ids = {}
for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
local payloads = redis.call('HMGET', KEYS[4], unpack(ids))
local out = {}
if ARGV[3] == '1' then
  local seen = redis.call('HMGET', KEYS[6], unpack(ids))
  local deadline = now + tonumber(ARGV[2])
  local lease, counts = {}, {}
  for i, id in ipairs(ids) do
    if payloads[i] then
      local n = (tonumber(seen[i]) or 0) + 1
      lease[#lease + 1] = deadline; lease[#lease + 1] = id
      counts[#counts + 1] = id; counts[#counts + 1] = n
      out[#out + 1] = {id, n, payloads[i]}
    else
      -- Its payload is gone (evicted, edited by hand): nothing to deliver; drop the leftovers.
      redis.call('HDEL', KEYS[5], id); redis.call('HDEL', KEYS[6], id)
    end
  end
  if #lease > 0 then
    redis.call('ZADD', KEYS[3], unpack(lease))
    redis.call('HSET', KEYS[6], unpack(counts))
  end
else
  for i, id in ipairs(ids) do
    if payloads[i] then out[#out + 1] = {id, 0, payloads[i]} end
  end
  redis.call('HDEL', KEYS[4], unpack(ids))
  redis.call('HDEL', KEYS[5], unpack(ids))
  redis.call('HDEL', KEYS[6], unpack(ids))
end
return out
"#
    )
}

/// KEYS: inflight, data, score, dlv. ARGV: (id, deliveries)*. Returns how many were removed;
/// a receipt that no longer holds the lease is ignored.
pub const ACKNOWLEDGE: &str = r#"
local ids, want = {}, {}
for i = 1, #ARGV, 2 do ids[#ids + 1] = ARGV[i]; want[#want + 1] = ARGV[i + 1] end
local leased = redis.call('ZMSCORE', KEYS[1], unpack(ids))
local counts = redis.call('HMGET', KEYS[4], unpack(ids))
local done = {}
for i, id in ipairs(ids) do
  if leased[i] and counts[i] == want[i] then done[#done + 1] = id end
end
if #done == 0 then return 0 end
redis.call('ZREM', KEYS[1], unpack(done))
redis.call('HDEL', KEYS[2], unpack(done))
redis.call('HDEL', KEYS[3], unpack(done))
redis.call('HDEL', KEYS[4], unpack(done))
return #done
"#;

/// KEYS: inflight, ready, delayed, score, dlv, signal. ARGV: id, deliveries, delay_ms.
pub fn fail() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local id = ARGV[1]
if not holds(KEYS[1], KEYS[5], id, ARGV[2]) then return 0 end
local score = redis.call('HGET', KEYS[4], id) or (32767 * 68719476736 + tonumber(id))
redis.call('ZREM', KEYS[1], id)
local delay = tonumber(ARGV[3])
if delay > 0 then
  redis.call('ZADD', KEYS[3], now + delay, id)
else
  redis.call('ZADD', KEYS[2], score, id)
  redis.call('LPUSH', KEYS[6], 1)
  redis.call('LTRIM', KEYS[6], 0, 63)
end
return 1
"#
    )
}

/// KEYS: inflight, data, score, dlv, dead, deadinfo, deaddata. ARGV: id, deliveries, reason.
pub fn dead_letter() -> String {
    format!(
        "{PRELUDE}{}",
        r#"
local id = ARGV[1]
if not holds(KEYS[1], KEYS[4], id, ARGV[2]) then return 0 end
local payload = redis.call('HGET', KEYS[2], id) or ''
redis.call('ZREM', KEYS[1], id)
redis.call('HSET', KEYS[7], id, payload)
redis.call('HSET', KEYS[6], id, ARGV[2] .. '|' .. now .. '|' .. ARGV[3])
redis.call('ZADD', KEYS[5], now, id)
redis.call('HDEL', KEYS[2], id); redis.call('HDEL', KEYS[3], id); redis.call('HDEL', KEYS[4], id)
return 1
"#
    )
}

/// KEYS: ready, delayed, inflight, data, score, dlv. ARGV: id. Removes it wherever it is.
pub const DELETE: &str = r#"
local id = ARGV[1]
local n = redis.call('ZREM', KEYS[1], id) + redis.call('ZREM', KEYS[2], id) + redis.call('ZREM', KEYS[3], id)
redis.call('HDEL', KEYS[4], id); redis.call('HDEL', KEYS[5], id); redis.call('HDEL', KEYS[6], id)
return n
"#;

/// KEYS: ready, delayed, data, score, dlv. ARGV: most to delete. Deletes up to that many of
/// what waits (not what is in flight) and returns how many: called until it returns 0, so Redis
/// is never blocked for long on a huge queue.
pub const PURGE: &str = r#"
local limit = tonumber(ARGV[1])
local n = 0
for k = 1, 2 do
  if n < limit then
    local ids = redis.call('ZRANGE', KEYS[k], 0, limit - n - 1)
    if #ids > 0 then
      redis.call('ZREM', KEYS[k], unpack(ids))
      redis.call('HDEL', KEYS[3], unpack(ids))
      redis.call('HDEL', KEYS[4], unpack(ids))
      redis.call('HDEL', KEYS[5], unpack(ids))
      n = n + #ids
    end
  end
end
return n
"#;
