"""Lua scripts: each runs atomically inside one shard's hash slot (all KEYS share a tag)."""

from __future__ import annotations

from typing import Final

# KEYS: stream, body, retry, dedupe, then (stream, retry) of each other traffic class of the
# shard: the high-water mark bounds the shard's whole queue, whatever the classes.
# ARGV: qid, entry, data, dedupe_ttl_ms, high_water, ok, group, consumer, deadline_ms
# Returns {"ok", stream_id} | {"ok", stream_id, read_id[, read_entry]} | {"dup", original_qid}
# | {"full"} | {"late", now_ms}: past its deadline (Redis's clock; "" for none) the accept was
# answered 451 already, so the script does nothing (queue/late_writes.py).
# With a consumer, the accepting process reads the stream's next new entry for
# itself in the same step (its own, unless older ones wait unread): its worker holds that body
# in memory and knows when it is confirmed, where another process would load the body and poll
# for the confirmation mark. A blocked reader is only served once the script is done. The
# entry comes back only when it is an older one: the caller has its own.
ENQUEUE: Final = """
if ARGV[9] ~= '' then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if now > tonumber(ARGV[9]) then return {'late', tostring(now)} end
end
local dedupe = tonumber(ARGV[4]) > 0
if dedupe then
  local original = redis.call('GET', KEYS[4])
  if original then
    -- A resend answers with the first copy: delivered already (its body gone; a cancelled
    -- copy takes its dedupe key with it), confirmed, or neither yet. In the last case the
    -- first accept was answered 451 and its tombstone may be lost with a demoted primary (or
    -- still on its way): the resend adopts the copy, and CANCEL spares an adopted body, so
    -- exactly one copy is delivered. The caller's WAIT covers the adoption before its 250.
    local body = string.sub(KEYS[2], 1, #KEYS[2] - #ARGV[1]) .. original
    if redis.call('EXISTS', body) == 1 and redis.call('HGET', body, 'ok') ~= '1' then
      redis.call('HSET', body, 'ok', '1', 'a', '1')
    end
    return {'dup', original}
  end
end
local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[3])
for i = 5, #KEYS, 2 do
  depth = depth + redis.call('XLEN', KEYS[i]) + redis.call('ZCARD', KEYS[i + 1])
end
if depth >= tonumber(ARGV[5]) then
  return {'full'}
end
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[2], 'd', ARGV[3], 'ok', '1')
else
  redis.call('HSET', KEYS[2], 'd', ARGV[3])
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
if dedupe then redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[4]) end
if ARGV[8] ~= '' then
  -- pcall: should the group be gone (deleted under us), the accept still stands and its
  -- entry waits in the stream as before.
  local got = redis.pcall(
    'XREADGROUP', 'GROUP', ARGV[7], ARGV[8], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if type(got) == 'table' and got[1] then
    local read = got[1][2][1]
    if read[1] == id then return {'ok', id, id} end
    return {'ok', id, read[1], read[2][2]}
  end
end
return {'ok', id}
"""

# The tombstone of RFC 5321 section 4.2.5: we answered 4xx, so this copy must never be sent.
# Deleting the body is the tombstone (a worker that finds no body drops the entry); the dedupe
# key goes too, or the sender's retry would be answered with the cancelled copy's id. A body a
# resend adopted ('a', see ENQUEUE) answers for that resend's 250 now and stays.
# KEYS: body, dedupe   ARGV: qid
CANCEL: Final = """
if redis.call('HGET', KEYS[1], 'a') == '1' then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Move due retries back into the stream; ZREM in the same script means each moves once,
# however many nodes run the scheduler.   KEYS: stream, retry   ARGV: now_ms, limit
MOVE_DUE: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, entry in ipairs(due) do
  redis.call('XADD', KEYS[1], '*', 'm', entry)
  redis.call('ZREM', KEYS[2], entry)
end
return #due
"""

# Mark a body's durability as confirmed, unless it is already gone (delivered, or tombstoned):
# the mark goes out after the 250, so it must not bring a deleted body back as a stray key.
# KEYS: body
CONFIRM: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'ok', '1') end
return 1
"""

# Record a delivery attempt's outcome in one atomic step: acknowledge and delete the entry,
# schedule what is left to retry, dead-letter what failed, drop the body once nothing needs it.
# Once only: an entry acknowledged already (a finish whose reply was lost and is sent again,
# or one another node claimed and finished) changes nothing, so no dead letter is doubled.
# A dead letter split off a message whose other recipients wait for a retry gets a copy of the
# body under its own id (KEYS[5]): with one body for both, whichever ended first (the retry
# delivered, the letter purged or requeued and delivered) deleted the other's, and that part
# was then dropped as if cancelled.
# KEYS: stream, retry, dead, body, dead letter's body (the body itself when not split)
# ARGV: group, entry_id, retry_entry|"", retry_due_ms, dead_entry|"", dead_reason, drop_body,
#       split ("1": copy the body for the dead letter)
FINISH: Final = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3]) end
if ARGV[8] == '1' then redis.call('COPY', KEYS[4], KEYS[5]) end
if ARGV[5] ~= '' then redis.call('XADD', KEYS[3], '*', 'm', ARGV[5], 'reason', ARGV[6]) end
if ARGV[7] == '1' then redis.call('DEL', KEYS[4]) end
return 1
"""
