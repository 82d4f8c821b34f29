"""Context lengths: how they are written, and the one rule for a context bucket.

Written as a number of tokens with an optional suffix, k (x1024) or m (x1048576): `8k`, `32k`, `128k`,
`1m`, `4096`. A context bucket (the max_seq_len of a model, a cache, an engine or a tuned entry) is a
multiple of 128 from 128 to 1m: 128 is the largest compress ratio, and the compressed caches hold whole
compressed blocks. `build`, `kv-cache` and `tune` take `--context` through `parse_contexts`;
`dsv4_compile.tuning.tuned_config` takes the same strings.
"""
from __future__ import annotations

import re

from .config import COMPRESS_RATIOS

CONTEXT_MULTIPLE = max(COMPRESS_RATIOS)  # 128
CONTEXT_MAX = 1 << 20                    # 1m
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}
_PATTERN = re.compile(r"(\d+)([km]?)", re.IGNORECASE)
WRITTEN = "a positive integer with an optional suffix k (x1024) or m (x1048576), e.g. 8k,32k,128k,1m or 4096"
BUCKETS = f"multiples of {CONTEXT_MULTIPLE} from {CONTEXT_MULTIPLE} to 1m ({CONTEXT_MAX}), e.g. 512,8k,32k"


class ContextError(ValueError):
    """A context length that is badly written or not a valid bucket. The message is one line."""


def parse_context_length(text: str) -> int:
    """'8k' -> 8192, '1m' -> 1048576, '4096' -> 4096 (suffix case-insensitive); how it is written only."""
    match = _PATTERN.fullmatch(str(text).strip())
    if not match:
        raise ContextError(f"bad context length {str(text).strip()!r}: expected {WRITTEN}")
    value = int(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value <= 0:
        raise ContextError(f"bad context length {str(text).strip()!r}: must be > 0; expected {WRITTEN}")
    return value


def parse_context_lengths(text: str) -> list[int]:
    """'8k,32k,128k,1m' -> [8192, 32768, 131072, 1048576], in the order given."""
    items = str(text).split(",")
    if not str(text).strip() or any(not item.strip() for item in items):
        raise ContextError(f"bad context list {text!r}: expected comma-separated values, each {WRITTEN}")
    return [parse_context_length(item) for item in items]


def check_context(tokens: int) -> int:
    """`tokens` if it is a valid context bucket (see the module docstring), else ContextError."""
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise ContextError(f"bad context {tokens!r}: expected a number of tokens or a string like '8k'")
    if tokens <= 0 or tokens % CONTEXT_MULTIPLE or tokens > CONTEXT_MAX:
        raise ContextError(f"unsupported context {format_context(tokens)} ({tokens} tokens); accepted: {BUCKETS}")
    return tokens


def parse_context(text: str) -> int:
    """One context bucket as the CLI writes it: '8k' -> 8192; '100', '5m' or '8q' -> ContextError."""
    return check_context(parse_context_length(text))


def parse_contexts(text: str) -> list[int]:
    """A --context list: each written as above and a valid bucket; in the order given, repeats dropped."""
    return list(dict.fromkeys(check_context(tokens) for tokens in parse_context_lengths(text)))


def format_context(tokens: int) -> str:
    """Inverse of parse_context_length where exact: 1048576 -> '1m', 8192 -> '8k', 1000 -> '1000'."""
    for suffix in ("m", "k"):
        if tokens and tokens % _SUFFIX[suffix] == 0:
            return f"{tokens // _SUFFIX[suffix]}{suffix}"
    return str(tokens)
