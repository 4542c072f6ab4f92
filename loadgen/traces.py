"""Request traces for replay: Mooncake JSONL and Azure CSV files, and the token blocks of Mooncake ids.

Both readers load and validate the whole file: a problem is a `WorkloadError` that names the file
and the line (1-based, as an editor shows it) and says what is wrong. Each record keeps its line
number and its time in seconds on the trace's own clock.

- Mooncake (`mooncake_conversation.jsonl`): one JSON object per line, `{"timestamp": ms,
  "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}`; each hash id names a
  512-token block, chained like prefix hashes, so `len(hash_ids) == ceil(input_length / 512)`.
  Blank lines are ignored.
- Azure (`azure2023_conv.csv`): a header with `TIMESTAMP`, `ContextTokens` and `GeneratedTokens`
  (any order, other columns ignored), timestamps like `2023-11-16 18:15:46.6805900` (up to 9
  fractional digits, read exactly as integer nanoseconds, not through `strptime`'s `%f`).

Timestamps need not increase; they must be finite numbers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from loadgen.types import WorkloadError

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens named by one hash id in a Mooncake trace."""
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_AZURE_TIME = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?")
_BLOCK_SEED_DOMAIN = 0x6B7677_6D6F6F6E
"""Mixed into every block's seed so that block streams differ from any other use of the same numbers."""
_U64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
"""SplitMix64's increment: added before mixing so that id 0 does not map to 0 (still a bijection)."""


@dataclass(frozen=True, slots=True)
class MooncakeRecord:
    line: int
    timestamp_s: float
    """The trace's `timestamp` (milliseconds) in seconds."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AzureRecord:
    line: int
    timestamp_s: float
    """Seconds after the file's first row."""
    input_length: int
    """The row's ContextTokens."""
    output_length: int
    """The row's GeneratedTokens."""


def _read_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text file, or a WorkloadError when it is missing or unreadable."""
    if not path.exists():
        raise WorkloadError(f"{what} not found: {path}")
    if not path.is_file():
        raise WorkloadError(f"{what} is not a file: {path}")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield from enumerate(f, start=1)
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"cannot read {what} {path}: {e}") from None


def _integer(value: object, where: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkloadError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise WorkloadError(f"{where}: {name} must be at least {minimum}, got {value}")
    return value


def read_mooncake(path: str | os.PathLike) -> list[MooncakeRecord]:
    """Every record of a Mooncake-format JSONL trace, in file order."""
    path = Path(path)
    records = []
    for number, text in _read_lines(path, "Mooncake trace"):
        if not text.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [key for key in _MOONCAKE_KEYS if key not in obj]
        if missing:
            raise WorkloadError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(k) for k in missing)}")
        timestamp = obj["timestamp"]
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
            raise WorkloadError(f"{where}: timestamp must be a number of milliseconds, got {timestamp!r}")
        input_length = _integer(obj["input_length"], where, "input_length", 1)
        output_length = _integer(obj["output_length"], where, "output_length", 1)
        hash_ids = obj["hash_ids"]
        if not isinstance(hash_ids, list):
            raise WorkloadError(f"{where}: hash_ids must be a list of integers, got {hash_ids!r}")
        for h in hash_ids:
            _integer(h, where, "every hash id", 0)
            if h > _U64:
                raise WorkloadError(f"{where}: hash id {h} does not fit in 64 bits")
        blocks = -(-input_length // MOONCAKE_BLOCK_TOKENS)
        if len(hash_ids) != blocks:
            raise WorkloadError(f"{where}: {len(hash_ids)} hash_ids, but input_length {input_length} spans "
                                f"ceil({input_length}/{MOONCAKE_BLOCK_TOKENS}) = {blocks} blocks")
        records.append(MooncakeRecord(number, timestamp / 1000.0, input_length, output_length, tuple(hash_ids)))
    if not records:
        raise WorkloadError(f"Mooncake trace {path} holds no records")
    return records


def parse_azure_timestamp(text: str) -> int:
    """Nanoseconds since 0001-01-01 of `YYYY-MM-DD HH:MM:SS[.fraction]` (up to 9 fractional digits);
    ValueError when the text is not such a timestamp or names an impossible date or time."""
    match = _AZURE_TIME.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected YYYY-MM-DD HH:MM:SS[.fraction]")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    moment = datetime(year, month, day, hour, minute, second)
    seconds = moment.toordinal() * 86400 + hour * 3600 + minute * 60 + second
    return seconds * 1_000_000_000 + int((match.group(7) or "").ljust(9, "0"))


def read_azure(path: str | os.PathLike) -> list[AzureRecord]:
    """Every row of an Azure-format CSV trace, in file order, timed from the first row."""
    path = Path(path)
    lines = _read_lines(path, "Azure trace")
    reader = csv.reader(text for _, text in lines)
    header = next(reader, None)
    if header is None:
        raise WorkloadError(f"Azure trace {path} is empty (expected a header {','.join(_AZURE_COLUMNS)})")
    names = [name.strip() for name in header]
    missing = [c for c in _AZURE_COLUMNS if c not in names]
    if missing:
        raise WorkloadError(f"{path}, line 1: header {','.join(names)!r} lacks column(s) {', '.join(missing)}")
    time_col, in_col, out_col = (names.index(c) for c in _AZURE_COLUMNS)
    records: list[AzureRecord] = []
    first_ns = 0
    for row in reader:
        if not row:
            continue
        where = f"{path}, line {reader.line_num}"
        if len(row) != len(names):
            raise WorkloadError(f"{where}: {len(row)} fields, expected {len(names)} ({','.join(names)})")
        try:
            ns = parse_azure_timestamp(row[time_col])
        except ValueError as e:
            raise WorkloadError(f"{where}: bad TIMESTAMP {row[time_col]!r} ({e})") from None
        lengths = []
        for col, minimum in ((in_col, 1), (out_col, 1)):
            try:
                value = int(row[col])
            except ValueError:
                raise WorkloadError(f"{where}: {names[col]} must be an integer, got {row[col]!r}") from None
            if value < minimum:
                raise WorkloadError(f"{where}: {names[col]} must be at least {minimum}, got {value}")
            lengths.append(value)
        if not records:
            first_ns = ns
        records.append(AzureRecord(reader.line_num, (ns - first_ns) / 1e9, lengths[0], lengths[1]))
    if not records:
        raise WorkloadError(f"Azure trace {path} holds no records (only a header)")
    return records


def _mix64(value: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers that scatters nearby values."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _U64
    return value ^ (value >> 31)


def block_tokens(hash_id: int, block_size: int, lo: int, hi: int) -> tuple[int, ...]:
    """The `block_size` token ids in [lo, hi) that stand for trace block `hash_id` (0 <= id < 2**64).

    They depend only on these four numbers: the same id always gives the same block. The first
    tokens are the digits, in base hi - lo, of a 64-bit bijective mix of the id, so different ids
    give different blocks whenever (hi - lo) ** block_size >= 2 ** 64 (e.g. 8 tokens over a range
    of 490 ids, 5 over 1000:30000); the rest come from PCG64 seeded with the same numbers.
    """
    if not 0 <= hash_id <= _U64:
        raise ValueError(f"hash id {hash_id} is not a 64-bit unsigned integer")
    if block_size < 1 or not 0 <= lo < hi:
        raise ValueError(f"bad block size {block_size} or token range {lo}:{hi}")
    base = hi - lo
    digits, capacity = 0, 1
    while capacity <= _U64 and digits < block_size:
        capacity *= base
        digits += 1
    mixed = _mix64((hash_id + _GOLDEN_GAMMA) & _U64)
    head = []
    for _ in range(digits):
        mixed, digit = divmod(mixed, base)
        head.append(lo + digit)
    seed = np.random.SeedSequence([_BLOCK_SEED_DOMAIN, hash_id, block_size, lo, hi])
    rest = np.random.Generator(np.random.PCG64(seed)).integers(lo, hi, size=block_size - digits)
    return tuple(head) + tuple(rest.tolist())
