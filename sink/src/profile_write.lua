-- Writes one batch of user profiles and never lets a key go back in time (semantics §6).
--
-- KEYS[i]       user_profile:{user_id}
-- ARGV[3i-2]    the new value's timestamp (decimal)
-- ARGV[3i-1]    the new value's epoch (decimal)
-- ARGV[3i]      the new value (JSON, as encoded by the sink)
--
-- On a Redis Cluster a batch holds the keys of many slots of one node, which a command may not
-- declare (CROSSSLOT). Its form there declares no key and passes them first in ARGV:
-- ARGV[1] = n, ARGV[2..n+1] = the keys, then the n (timestamp, epoch, value) triples; the sink
-- loads it with the `allow-cross-slot-keys` flag (src/cluster.rs). A key the node does not serve
-- (it moved during a resharding) is refused alone, reported like a WRONGTYPE key, and resent by
-- the sink to its new node.
--
-- A key is written iff it is absent, or new_ts > old_ts, or new_ts == old_ts and
-- new_epoch >= old_epoch. A later epoch with the same timestamp must win: an item-feature update
-- changes the vector without changing the timestamp. Equal (ts, epoch) is a replay after a crash
-- or a retried batch and carries the same value, so rewriting it is harmless. Everything else is
-- stale and skipped; the script returns how many keys it skipped.
--
-- The stored (timestamp, epoch) is read from the JSON by pattern instead of cjson.decode, which
-- would build the whole value (history, vector) as Lua tables for two numbers. This is safe
-- because inside a JSON string every '"' is escaped as '\"': the character before a quote that
-- belongs to a string's content is always a backslash, so in `p":` the quote is a string
-- delimiter, and a delimiter followed by a colon closes an object key. No user_id or item id can
-- therefore contain a match for '"timestamp":' (its text would be stored as `\"timestamp\":`),
-- and the only key of the value that matches is the top-level "timestamp". The epoch is the
-- last field of the value, so '"epoch":N}' anchored at the end is the real one.
-- '%s*' also accepts values written with spaces (Python's json.dumps); a stored value without a
-- readable timestamp (not written by this sink) is overwritten, and one without an epoch counts
-- as epoch 0.
--
-- Only the head of the stored value is read, not all of it: Redis's Lua hashes every byte of
-- every string it makes, and a GET of a ~1.2 KB value cost more than the rest of the check. The
-- timestamp comes second in the value, after the user id, so the first HEAD_BYTES hold it for
-- any user id shorter than about 220 bytes; '%D' after the digits makes sure they were not cut
-- at the head's end, and a longer head falls back to reading the whole value. The epoch, at the
-- far end, is read (as the last 64 bytes) only when the timestamps are equal, which is rare: an
-- item-feature update or a replay. A second GETRANGE for every key measured slower than one GET.
--
-- Timestamps (<= 2^53, semantics §2) and epochs (Unix ms of the epoch start) are compared as Lua
-- numbers, i.e. doubles, which hold every integer up to 2^53 exactly; the sink refuses larger
-- values before they get here.
local HEAD_BYTES = 256
-- GETRANGE's offsets as strings: Redis turns a Lua number argument into a string with
-- sprintf("%.17g"), which `perf` showed at 3% of the script's time when done twice per key.
local HEAD_FIRST, HEAD_LAST = '0', tostring(HEAD_BYTES - 1)
local keys, first = KEYS, 0
if #KEYS == 0 then
    local n = tonumber(ARGV[1])
    keys = {}
    for i = 1, n do
        keys[i] = ARGV[1 + i]
    end
    first = 1 + n
end
local skipped = 0
-- Keys refused (for good, or not served by this cluster node), as {key, error} pairs; see below.
local rejected = {}
for i = 1, #keys do
    local base = first + 3 * (i - 1)
    local ts = tonumber(ARGV[base + 1])
    local epoch = tonumber(ARGV[base + 2])
    local write = true
    -- pcall, because a key that holds another type (a hash someone else put there) fails with
    -- WRONGTYPE, and redis.call would abort the whole batch after some of its keys were written,
    -- leaving the sink to retry a batch that can never succeed. Such a key is left untouched
    -- (it is not ours to clobber) and reported; the other keys are written. GETRANGE is the first
    -- command on every key, so once it succeeded the key is a string (or absent) and the GET and
    -- SET below cannot fail that way. Any other error is raised as before, failing the batch.
    -- '' for a missing key (and for an empty value, which holds no timestamp either).
    -- On a cluster, a key this node does not serve fails the same way ("Script attempted to
    -- access a non local key in a cluster node"), and is reported the same way for the sink to
    -- resend where it lives now.
    local head = redis.pcall('GETRANGE', keys[i], HEAD_FIRST, HEAD_LAST)
    if type(head) == 'table' then
        if string.sub(head.err, 1, 10) ~= 'WRONGTYPE ' and not string.find(head.err, 'non local key', 1, true) then
            return head
        end
        rejected[#rejected + 1] = keys[i]
        rejected[#rejected + 1] = head.err
    else
        local old_ts = tonumber(string.match(head, '"timestamp":%s*(%d+)%D'))
        if not old_ts and #head == HEAD_BYTES then
            old_ts = tonumber(string.match(redis.call('GET', keys[i]), '"timestamp":%s*(%d+)'))
        end
        if old_ts then
            if ts == old_ts then
                local tail = redis.call('GETRANGE', keys[i], '-64', '-1')
                local old_epoch = tonumber(string.match(tail, '"epoch":%s*(%d+)%s*}%s*$')) or 0
                write = epoch >= old_epoch
            else
                write = ts > old_ts
            end
        end
        if write then
            redis.call('SET', keys[i], ARGV[base + 3])
        else
            skipped = skipped + 1
        end
    end
end
-- The usual reply stays a bare count; only a batch with refused keys answers
-- {skipped, key1, error1, key2, error2, ...}.
if #rejected == 0 then
    return skipped
end
table.insert(rejected, 1, skipped)
return rejected
