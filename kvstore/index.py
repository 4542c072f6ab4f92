"""The KV index in Redis: which worker holds which KV entry, in which tier, how big, last used when.

Layout: one Redis hash per (worker, tier), `kvweave:kv:<worker_id>:<tier>` (tier = medium:
device, dram, ssd), whose fields are the entries' 16-byte key hashes (`KVKey.hash`, which already
commits to model, namespace and kind) and whose values are `b"<nbytes>:<last access, unix ms>"`.
Workers apply their KV events (stored / removed / touched) in batches, one pipeline per batch, and
refresh the hashes' TTL with their lease, so a dead worker's entries vanish with it. Redis never
holds KV bytes.

Reads, each ONE round trip:
- `locate`: for every key, the (worker, tier, nbytes, last access) that hold it (HMGET per
  (worker, tier) in one pipeline); `holders`: for groups of keys (a chunk-cache's or an image
  embedding's entries), the workers that hold a whole group;
- `leading_tiers` (the router's hot path, a Lua script): for the longest leading run of blocks
  that one worker holds (in any of its tiers), a string per worker with one code per block:
  b"1".. the index+1 of the fastest of `mediums` holding it, for the worker's own leading run,
  then b"0" up to the longest run: blocks it would fetch from that peer (a worker fetches what
  it lacks from the one peer with the longest run, worker/kv_prefetch.py). Counting codes
  (`bytes.count`) gives a worker's per-tier hits and peer blocks with no Python loop; replies are
  one bulk string per worker, each worker's scan stops at its first miss, and the hashes go as ONE
  concatenated argument (packing arguments was most of the client's cost);
- `route_tiers` (the same script, same round trip): `leading_tiers`' codes plus, per reusable
  chunk of the request (its entry keys, `kvstore.chunks.chunk_block_keys`), per worker, where the
  worker would get the chunk: b"2"/b"3" the slowest tier among its entries when the worker holds
  all of them (each entry counted in the fastest of its tiers holding it), b"0" when another worker
  holds all of them, b"-" when nobody does. Chunks are looked for in `CHUNK_MEDIUMS` (the
  host tiers, where workers keep chunk-caches) among the tiers each worker is asked about.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvstore.keys import HASH_BYTES, BlockHash
from kvweave.defaults import REGISTRY_LEASE_S
from kvweave.redis_pipe import PipelinedRedis, PipelinedScript

MEDIUMS = ("device", "dram", "ssd")
TIER_CODES = {ord(str(i + 1)): m for i, m in enumerate(MEDIUMS)} | {ord("0"): "peer"}
"""`leading_tiers` code (a byte) -> where the block comes from."""
CHUNK_MEDIUMS = ("dram", "ssd")
"""Tiers that hold chunk-caches."""
DEFAULT_COSTS_MS = {"device": 0.0, "dram": 0.002, "ssd": 0.02, "peer": 0.03, "recompute": 1.0}
"""Milliseconds per prompt token to get its KV from each source, or to compute it, until a worker
has measured its own. From `kvweave bench kvstore` / `bench engine` on the 2-core development
machine: DRAM 1.3 ms and SSD 10 ms per 512 tokens, recompute ~470 ms per 512 tokens; peer: the
transfer's ~0.008 ms per token plus the per-fetch index lookup and connection, rounded up."""
_BATCH = 1000

# KEYS: each worker's tier hashes (fastest first), worker after worker. ARGV[1] = per worker, how
# many tiers it has (one digit each), ARGV[2] = the prompt's block hashes in order, concatenated,
# ARGV[3] = hash size, ARGV[4] = per key, its tier's code (one digit: 1 device, 2 dram, 3 ssd).
# Per worker, blocks are checked slice by slice (16, then 128, 1024, 4000: Lua's unpack has a stack
# limit of ~8k values), each tier only for the blocks the faster tiers lacked, and the scan stops
# at the worker's first miss. Only the tiers a worker has are passed (each HMGET costs ~15 us).
# Chunks (`route_tiers` only): ARGV[5] = every chunk's entry hashes, chunk after chunk,
# concatenated; ARGV[6] = each chunk's number of entries, space-separated; ARGV[7] = per key, "1"
# if chunk entries are looked for there. Per worker, one HMGET per such tier (in slices of 4000)
# over the entries its faster tiers lacked; a chunk's code is the slowest of its entries' fastest
# tiers. The reply then also has, after the nw prefix strings, one string per worker with a code
# per chunk: its own tier code, else "0" when another worker holds every entry, else "-".
_LEADING_TIERS_LUA = """
local counts = ARGV[1]
local blob = ARGV[2]
local size = tonumber(ARGV[3])
local tiers = ARGV[4]
local n = #blob / size
local hashes = {}
for i = 1, n do hashes[i] = string.sub(blob, (i - 1) * size + 1, i * size) end
local nw = #counts
local codes, runs, run, base = {}, {}, 0, 0
for w = 1, nw do
  local m = tonumber(string.sub(counts, w, w))
  local first = string.sub(tiers, base + 1, base + 1)
  local c, count, start, slice, done = {}, 0, 1, 16, false
  while start <= n and not done do
    local stop = math.min(start + slice - 1, n)
    local held = redis.call('HMGET', KEYS[base + 1], unpack(hashes, start, stop))
    local pending = nil
    for j = 1, stop - start + 1 do
      if held[j] then
        held[j] = first
      else
        pending = pending or {}
        pending[#pending + 1] = j
      end
    end
    if pending then
      for k = base + 2, base + m do
        local args, still, code = {}, {}, string.sub(tiers, k, k)
        for p = 1, #pending do args[p] = hashes[start + pending[p] - 1] end
        local more = redis.call('HMGET', KEYS[k], unpack(args))
        for p = 1, #pending do
          if more[p] then held[pending[p]] = code else still[#still + 1] = pending[p] end
        end
        pending = still
        if #pending == 0 then break end
      end
    end
    for j = 1, stop - start + 1 do
      if not held[j] then done = true; break end
      count = count + 1
      c[count] = held[j]
    end
    start = stop + 1
    slice = math.min(slice * 8, 4000)
  end
  codes[w], runs[w] = table.concat(c), count
  if count > run then run = count end
  base = base + m
end
local out = {}
for w = 1, nw do out[w] = codes[w] .. string.rep('0', run - runs[w]) end
if #ARGV < 5 then return out end
local entries, ce = {}, #ARGV[5] / size
for i = 1, ce do entries[i] = string.sub(ARGV[5], (i - 1) * size + 1, i * size) end
local sizes = {}
for s in string.gmatch(ARGV[6], '%d+') do sizes[#sizes + 1] = tonumber(s) end
local mask, nc = ARGV[7], #sizes
local own, anyone = {}, {}
base = 0
for w = 1, nw do
  local m = tonumber(string.sub(counts, w, w))
  local held, pending = {}, {}
  for i = 1, ce do pending[i] = i end
  for k = base + 1, base + m do
    if #pending == 0 then break end
    if string.sub(mask, k, k) == '1' then
      local code, still = string.sub(tiers, k, k), {}
      for s = 1, #pending, 4000 do
        local e, args = math.min(s + 3999, #pending), {}
        for p = s, e do args[p - s + 1] = entries[pending[p]] end
        local found = redis.call('HMGET', KEYS[k], unpack(args))
        for p = s, e do
          if found[p - s + 1] then held[pending[p]] = code else still[#still + 1] = pending[p] end
        end
      end
      pending = still
    end
  end
  local mine, first = {}, 1
  for j = 1, nc do
    local code, ok = nil, sizes[j] > 0
    for i = first, first + sizes[j] - 1 do
      local h = held[i]
      if not h then ok = false; break end
      if code == nil or h > code then code = h end
    end
    if ok then mine[j] = code; anyone[j] = true end
    first = first + sizes[j]
  end
  own[w] = mine
  base = base + m
end
for w = 1, nw do
  local c = {}
  for j = 1, nc do c[j] = own[w][j] or (anyone[j] and '0') or '-' end
  out[nw + w] = table.concat(c)
end
return out
"""


def index_key(worker_id: str, medium: str = "device") -> str:
    return f"kvweave:kv:{worker_id}:{medium}"


@dataclass(frozen=True, slots=True)
class Location:
    worker_id: str
    medium: str
    nbytes: int
    last_access_ms: int


def _value(nbytes: int, now_ms: int) -> bytes:
    return b"%d:%d" % (nbytes, now_ms)


class KVIndex:
    """Writes and reads the index through a `redis.asyncio.Redis` client; `leading_tiers` and
    `route_tiers` (the router's per-request lookup) go through `pipelined` when given (a
    `kvweave.redis_pipe.PipelinedRedis` on the same Redis: concurrent lookups share one
    connection, far less client time per lookup)."""

    def __init__(self, redis, lease_s: float = REGISTRY_LEASE_S, pipelined: PipelinedRedis | None = None) -> None:
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)
        self._leading_tiers = (redis.register_script(_LEADING_TIERS_LUA) if pipelined is None
                               else PipelinedScript(pipelined, _LEADING_TIERS_LUA))
        self._keys_cache: dict[tuple, tuple[list[str], str, str]] = {}

    async def apply_events(self, worker_id: str, events: Iterable, entry_bytes: int = 0) -> None:
        """Apply KV events in one pipeline: BlockStored / BlockTouched set the entry (size
        `entry_bytes`, last access now), BlockRemoved deletes it. Events name their medium."""
        now = int(time.time() * 1000)
        value = _value(entry_bytes, now)
        async with self.redis.pipeline(transaction=False) as pipe:
            touched = set()
            for ev in events:
                key = index_key(worker_id, ev.medium)
                touched.add(key)
                hashes = ev.block_hashes
                for i in range(0, len(hashes), _BATCH):
                    part = hashes[i:i + _BATCH]
                    if type(ev).__name__ == "BlockRemoved":
                        pipe.hdel(key, *part)
                    else:
                        pipe.hset(key, mapping=dict.fromkeys(part, value))
            for key in touched:
                pipe.pexpire(key, self.lease_ms)
            if touched:
                await pipe.execute()

    async def replace(self, worker_id: str, medium: str, hashes: Sequence[BlockHash], entry_bytes: int = 0) -> None:
        """Publish a full snapshot of one tier (after a restart or a lapsed lease)."""
        key = index_key(worker_id, medium)
        value = _value(entry_bytes, int(time.time() * 1000))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for i in range(0, len(hashes), _BATCH):
                pipe.hset(key, mapping=dict.fromkeys(hashes[i:i + _BATCH], value))
            pipe.pexpire(key, self.lease_ms)
            await pipe.execute()

    async def refresh(self, worker_id: str, mediums: Sequence[str] = MEDIUMS) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for m in mediums:
                pipe.pexpire(index_key(worker_id, m), self.lease_ms)
            await pipe.execute()

    async def clear(self, worker_id: str) -> None:
        await self.redis.delete(*(index_key(worker_id, m) for m in MEDIUMS))

    async def locate(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str],
                     mediums: Sequence[str] = MEDIUMS) -> list[list[Location]]:
        """For each of `hashes`: every (worker, tier) holding it, fastest tier first. One round trip."""
        out: list[list[Location]] = [[] for _ in hashes]
        if not hashes or not worker_ids:
            return out
        for (w, m), values in (await self._hmget(hashes, worker_ids, mediums)).items():
            for i, v in enumerate(values):
                if v is not None:
                    nbytes, _, last = v.partition(b":")
                    out[i].append(Location(w, m, int(nbytes or 0), int(last or 0)))
        rank = {m: i for i, m in enumerate(MEDIUMS)}
        for holders in out:
            holders.sort(key=lambda loc: rank.get(loc.medium, len(rank)))
        return out

    async def holders(self, groups: Mapping, worker_ids: Sequence[str], mediums: Sequence[str] = MEDIUMS
                      ) -> dict:
        """For each group of keys (a chunk-cache's or an embedding's entries, by any id): the workers
        that hold every key of it in one of `mediums`; groups nobody holds whole are left out. One
        round trip."""
        located = await self.locate([k for keys in groups.values() for k in keys], worker_ids, mediums)
        out, at = {}, 0
        for group, keys in groups.items():
            held = set(worker_ids)
            for locs in located[at:at + len(keys)]:
                held &= {loc.worker_id for loc in locs}
            at += len(keys)
            if held:
                out[group] = held
        return out

    async def lookup(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str],
                     mediums: Sequence[str] = ("device",)) -> dict[tuple[str, str], list[bool]]:
        """For each (worker, tier): which of `hashes` it holds. One round trip."""
        if not hashes or not worker_ids:
            return {}
        found = await self._hmget(hashes, worker_ids, mediums)
        return {pair: [v is not None for v in values] for pair, values in found.items()}

    async def _hmget(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str],
                     mediums: Sequence[str]) -> dict[tuple[str, str], list]:
        """(worker, tier) -> the index values of `hashes` there (None where absent): one pipeline."""
        pairs = [(w, m) for w in worker_ids for m in mediums]
        async with self.redis.pipeline(transaction=False) as pipe:
            for w, m in pairs:
                pipe.hmget(index_key(w, m), list(hashes))
            results = await pipe.execute()
        return dict(zip(pairs, results))

    async def leading_tiers(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str] | Mapping[str, Sequence[str]],
                            mediums: Sequence[str] = MEDIUMS) -> dict[str, bytes]:
        """Per worker, one code per block of the longest leading run one worker holds (see above):
        b"1" device, b"2" dram, b"3" ssd, b"0" from a peer. `worker_ids` may map each worker to
        the tiers it has (fastest first); otherwise every worker is asked about `mediums`."""
        if not hashes or not worker_ids:
            return {}
        tiers = worker_ids if isinstance(worker_ids, Mapping) else dict.fromkeys(worker_ids, mediums)
        keys, counts, codes = self._script_keys(tiers)
        replies = await self._leading_tiers(keys=keys, args=[counts, b"".join(hashes), HASH_BYTES, codes])
        return dict(zip(tiers, replies))

    async def route_tiers(self, hashes: Sequence[BlockHash], worker_tiers: Mapping[str, Sequence[str]],
                          chunks: Sequence[Sequence[bytes]], chunk_mediums: Sequence[str] = CHUNK_MEDIUMS,
                          ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """The router's lookup, ONE round trip: (per worker, `leading_tiers`' codes of `hashes`; per
        worker, one code per chunk of `chunks` (each the entry keys of one chunk-cache): b"1".."3"
        the slowest tier among the entries it holds all of, b"0" another worker holds all of them,
        b"-" nobody does or the chunk has no entries). `worker_tiers` maps each worker to the tiers
        it has (fastest first); chunks are looked for in those of them that are in `chunk_mediums`."""
        if not worker_tiers:
            return {}, {}
        if not chunks:
            return await self.leading_tiers(hashes, worker_tiers), dict.fromkeys(worker_tiers, b"")
        keys, counts, codes = self._script_keys(worker_tiers)
        mask = "".join("1" if m in chunk_mediums else "0" for ms in worker_tiers.values() for m in ms)
        entries = b"".join(k for chunk in chunks for k in chunk)
        sizes = " ".join(str(len(chunk)) for chunk in chunks)
        replies = await self._leading_tiers(keys=keys, args=[counts, b"".join(hashes), HASH_BYTES, codes,
                                                             entries, sizes, mask])
        n = len(worker_tiers)
        return dict(zip(worker_tiers, replies[:n])), dict(zip(worker_tiers, replies[n:]))

    def _script_keys(self, tiers: Mapping[str, Sequence[str]]) -> tuple[list[str], str, str]:
        """`_script_keys`, remembered per (worker, tiers) set: the same few sets come back for every
        request between changes of the pool."""
        pairs = tuple((w, tuple(ms)) for w, ms in tiers.items())
        found = self._keys_cache.get(pairs)
        if found is None:
            if len(self._keys_cache) >= 64:
                self._keys_cache.clear()
            found = self._keys_cache[pairs] = _script_keys(tiers)
        return found

    async def leading_hits(self, hashes: Sequence[BlockHash], worker_ids: Sequence[str],
                           mediums: Sequence[str] = ("device",)) -> dict[str, int]:
        """For each worker: the number of leading `hashes` it holds in any of `mediums`. One round trip."""
        return {w: local_run(c) for w, c in (await self.leading_tiers(hashes, worker_ids, mediums)).items()}


def _script_keys(tiers: Mapping[str, Sequence[str]]) -> tuple[list[str], str, str]:
    """The script's KEYS (each worker's tier hashes), per worker its number of tiers, per key its code."""
    keys, codes = [], []
    for w, ms in tiers.items():
        if len(ms) > 9:
            raise ValueError("at most 9 tiers per worker")
        keys += [index_key(w, m) for m in ms]
        codes += [str(MEDIUMS.index(m) + 1) for m in ms]
    return keys, "".join(str(len(ms)) for ms in tiers.values()), "".join(codes)


def local_run(codes: bytes) -> int:
    """Leading blocks a worker holds itself, from its `leading_tiers` codes."""
    i = codes.find(b"0")
    return len(codes) if i < 0 else i


def prefix_hits(held: Sequence[bool]) -> int:
    """Number of leading blocks held (a prefix cache can only use an unbroken run from the start)."""
    n = 0
    for h in held:
        if not h:
            break
        n += 1
    return n
