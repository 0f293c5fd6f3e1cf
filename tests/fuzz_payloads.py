"""Hostile payloads for every inbound topic, as hypothesis strategies (used by tests/test_fuzz.py).

A payload is the bytes a handler gets from the broker. Most start from a valid-looking
message of the topic's type (a JSON-ready dict, as ``protocol.messages`` serializes it),
with ids drawn from small pools so that the same job, task and attempt recur (replays,
duplicates, results for unknown jobs, senders other than the topic's agent).
:func:`generate` then delivers it as it is, or breaks it:

* field values replaced by wrong types, huge and negative integers (2**64, -1, 5,000
  digits), NaN, +-Infinity, 1e400, long, odd and lone-surrogate strings, nesting up to
  5,000 levels deep; fields removed, extra fields added, values wrapped; a wrong ``v`` or
  ``type``;
* tensors whose base64 data disagrees with their dtype and shape, invalid base64, unknown
  dtypes, and shapes with huge dimensions (``[2**31, 2**31]``: must never be allocated);
* binary frames (``protocol.codec``: ``b"\\x00EOB"``, u32 header length, JSON header,
  buffers) with wrong header lengths, bogus ``$buffers`` lists, buffer indices that point
  nowhere, headers that are not JSON or not an object, truncation and trailing bytes;
* raw corruption: truncated JSON, invalid UTF-8 inside strings, flipped bytes, random bytes;
* payloads padded to just above the size limit, and to exactly the limit (still valid).

Every choice comes from a :class:`Source`. :func:`structured` takes each one from
hypothesis, so that a failure shrinks to a minimal payload, at about 1,000 payloads a
second. :func:`seeded` takes one seed per batch from hypothesis and every other choice from
a PRNG seeded with it, about ten times faster, so that every topic gets its 10,000
payloads within the CI budget; a failure names the payload's seed, and
``sample(plan, seed, limit=...)`` makes it again.
"""

from __future__ import annotations

import binascii
import copy
import json
import math
import random
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

from protocol.codec import MAGIC
from protocol.tensors import DTYPES

T = TypeVar("T")

# Headers of generated binary frames nest at most this deep (json.dumps, which builds
# them, recurses too); test_fuzz.py::test_binary_frame_with_a_deeply_nested_header_is_counted
# sends frames thousands of levels deep by hand.
FRAME_DEPTH_CAP = 50

ITEMSIZE = {
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "bool": 1,
}
ERROR_CODES = (
    "malformed",
    "bad_request",
    "too_large",
    "unknown_model",
    "bad_input",
    "no_capacity",
    "execution_failed",
    "exhausted",
    "no_majority",
    "draining",
    "forbidden",
    "internal",
)
JOB_STATES = ("accepted", "running", "done", "failed")


@dataclass(frozen=True)
class Raw:
    """A JSON token that json.dumps cannot write (NaN spellings, 1e400, 5,000-digit integers,
    deep nesting); ``depth`` is how deeply it nests."""

    text: bytes
    depth: int = 0


def deep_list(depth: int) -> Raw:
    return Raw(b"[" * depth + b"]" * depth, depth)


def deep_dict(depth: int) -> Raw:
    return Raw(b'{"a":' * depth + b"0" + b"}" * depth, depth)


HUGE_INTS = (
    -1,
    -(2**31),
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    2**64 + 1,
    -(2**63) - 1,
    10**30,
)
RAW_TOKENS = tuple(
    Raw(t)
    for t in (
        b"NaN",
        b"-NaN",
        b"Infinity",
        b"-Infinity",
        b"1e400",
        b"-1e400",
        b"1e-400",
        b"-0",
        b"-0.0",
        b"1E+308",
        b"4.9e-324",
        b"1" + b"0" * 5000,
        b"-" + b"9" * 5000,
        b"0." + b"0" * 5000 + b"1",
        b"01",
        b"+1",
        b".5",
        b"0x10",
        b"tru",
        b"nul",
        b"[",
        b'"\\ud800"',
        b'"\\u0000"',
        b'"\\uZZZZ"',
    )
)
DEEP = tuple(f(d) for d in (2, 64, 201, 1000, 5000) for f in (deep_list, deep_dict))
ODD_STRINGS = (
    "",
    " ",
    "a" * 128,
    "a" * 129,
    "a" * 2001,
    "\ud800",
    "\udfff",
    "\x00",
    "a\nb",
    "job\n",
    "a/b",
    "+",
    "#",
    "$buffers",
    "..",
    "é" * 64,
    "\U0001f600" * 40,
    "\u202e",
    "x" * 70_000,  # above every size limit the tests configure
)
SPECIAL_FLOATS = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    2.0**53,
    0.1,
    -1.0,
    1e-7,
)
BAD_B64 = (
    "",
    "=",
    "A",
    "AA",
    "AAA",
    "AAAA=",
    "A===",
    "====",
    "!!!!",
    "AAAA\n",
    " AAAA",
    "AAAA AAAA",
    "AA==AA==",
    "\u00e9AAA",
    "A" * 4001,
)
BAD_DTYPES: tuple[Any, ...] = (
    "float128",
    "complex64",
    "object",
    "str",
    "",
    "FLOAT32",
    "<f4",
    "bfloat16",
    None,
    1,
)
BAD_SHAPES: tuple[Any, ...] = (
    [-1],
    [1.5],
    ["1"],
    [[1]],
    [None],
    [True],
    5,
    "1,64",
    [1] * 9,
    None,
    {},
    [2**64],
)
HUGE_SHAPES = (
    [2**31, 2**31],
    [2**31],
    [2**31] * 8,
    [2**31, 0],
    [0, 2**31],
    [2**31 + 1],
    [2**62],
    [2**31, 2**31, 2**31],
    [1, 2**31],
)
INVALID_UTF8 = (
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xa0\xa1",
    b"\xe2\x28\xa1",
    b"\xf0\x28\x8c\x28",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x80",
)
EXTRA_KEYS = ("extra", "V", "Type", "$buffers", "__proto__", "", "v ", "agent_id\x00")
BAD_BUFFER_LISTS: tuple[Any, ...] = (None, "3", {}, [-1], [1.5], [True], [2**64], [0] * 1025)
ATTEMPTS = (1, 1, 2, 3, 999, 1000, 1001, 2**31, 2**64)
TASK_SUFFIXES = ("0", "1", "2", "3", "0x1", "99999999999999999999", "x", "")
# Characters for random text: ASCII, controls, separators, wildcards, non-BMP, bidi, BOM.
ALPHABET = 'aZ09_.:-/+# \t\n\x00\x7f"\\é\u00a0\u202e\ufeff\U0001f600\u4e2d'


# -- where choices come from ---------------------------------------------------------------------


class Source:
    """The choices a generator makes; subclasses take them from hypothesis or a PRNG."""

    def int(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def float(self) -> float:
        """Any float, NaN and infinities included."""
        raise NotImplementedError

    def finite(self) -> float:
        """A plausible non-negative measurement."""
        raise NotImplementedError

    def text(self, max_size: int) -> str:
        raise NotImplementedError

    def binary(self, max_size: int) -> bytes:
        raise NotImplementedError

    def json_value(self) -> Any:
        raise NotImplementedError

    def bool(self) -> bool:
        return self.int(0, 1) == 1

    def pick(self, options: Sequence[T]) -> T:
        """One of ``options``; lists and dicts are copied, since mutations edit in place."""
        value = options[self.int(0, len(options) - 1)]
        return copy.deepcopy(value) if isinstance(value, list | dict) else value

    def number(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``, often at or near the bounds."""
        k = self.int(0, 9)
        if k == 0:
            return lo
        if k == 1:
            return hi
        if k <= 4:
            return min(lo + self.int(0, 10), hi)
        return self.int(lo, hi)


class DrawSource(Source):
    """Every choice from hypothesis: slower, but a failure shrinks to a minimal payload."""

    def __init__(self, draw: DrawFn) -> None:
        self._draw = draw

    def int(self, lo: int, hi: int) -> int:
        return self._draw(st.integers(lo, hi))

    def float(self) -> float:
        return self._draw(st.floats())

    def finite(self) -> float:
        return self._draw(st.floats(0, 1e6))

    def text(self, max_size: int) -> str:
        return self._draw(st.text(max_size=max_size))

    def binary(self, max_size: int) -> bytes:
        return self._draw(st.binary(max_size=max_size))

    def json_value(self) -> Any:
        return self._draw(JSON_VALUES)

    def number(self, lo: int, hi: int) -> int:
        return self._draw(st.integers(lo, hi))  # hypothesis favours bounds by itself


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


class RandomSource(Source):
    """Every choice from a PRNG seeded by hypothesis: fast and reproducible from the seed."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def float(self) -> float:
        r = self._rng
        k = r.random()
        if k < 0.4:
            return r.choice(SPECIAL_FLOATS)
        if k < 0.7:
            return r.uniform(-1e6, 1e6)
        return math.ldexp(r.random(), r.randint(-1074, 1024)) * r.choice((1, -1))

    def finite(self) -> float:
        return self._rng.choice((0.0, 1.0, 0.5, self._rng.uniform(0, 1e6)))

    def text(self, max_size: int) -> str:
        r = self._rng
        return "".join(r.choice(ALPHABET) for _ in range(r.randint(0, max_size)))

    def binary(self, max_size: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(0, max_size))

    def json_value(self, depth: int = 0) -> Any:
        k = self._rng.randint(0, 7 if depth < 3 else 5)
        if k == 0:
            return None
        if k == 1:
            return self.bool()
        if k == 2:
            return self.number(-(2**70), 2**70)
        if k == 3:
            return self.float()
        if k <= 5:
            return self.text(10)
        if k == 6:
            return [self.json_value(depth + 1) for _ in range(self.int(0, 4))]
        return {self.text(5): self.json_value(depth + 1) for _ in range(self.int(0, 4))}


Builder = Callable[[Source], Any]
# Where payloads go and what builds their messages; repeat a topic to weight it.
Plan = Sequence[tuple[str, Builder]]


class Sample:
    """A payload made from a PRNG seed: ``sample(plan, seed, limit=...)`` makes it again."""

    __slots__ = ("payload", "seed", "topic")

    def __init__(self, seed: int, topic: str, payload: bytes) -> None:
        self.seed, self.topic, self.payload = seed, topic, payload

    def __repr__(self) -> str:  # hypothesis prints failing batches: keep it short
        return f"Sample(seed={self.seed}, {len(self.payload)} bytes on {self.topic})"


def sample(plan: Plan, seed: int, *, limit: int) -> Sample:
    src = RandomSource(seed)
    topic, base = plan[src.int(0, len(plan) - 1)]
    return Sample(seed, topic, generate(src, base, limit=limit))


def seeded(
    plan: Plan, *, size: int, limit: int, salt: Callable[[], int] = lambda: 0
) -> SearchStrategy[list[Sample]]:
    """Batches of ``size`` payloads from one hypothesis-chosen seed: a PRNG seeded with it
    makes every other choice (about ten times faster than :func:`structured`).

    ``salt()`` is mixed into the seed: hypothesis starts every run with the same simplest
    examples, and a new salt per run keeps their payloads new.
    """

    def build(seed: int) -> list[Sample]:
        rng = random.Random(seed ^ (salt() << 64))
        return [sample(plan, rng.getrandbits(64), limit=limit) for _ in range(size)]

    return st.integers(0, 2**64 - 1).map(build)


def structured(plan: Plan, *, limit: int) -> SearchStrategy[tuple[str, bytes]]:
    """(topic, payload) pairs whose every choice is hypothesis's, so that a failure shrinks
    to a minimal payload."""

    @st.composite
    def build(draw: DrawFn) -> tuple[str, bytes]:
        src = DrawSource(draw)
        topic, base = plan[src.int(0, len(plan) - 1)]
        return topic, generate(src, base, limit=limit)

    return build()


# -- serialization --------------------------------------------------------------------------------


def _substitute(node: Any, raws: list[Raw], depth_cap: int | None) -> Any:
    if isinstance(node, Raw):
        if depth_cap is not None and node.depth > depth_cap:
            node = deep_list(depth_cap) if node.text[:1] == b"[" else deep_dict(depth_cap)
        raws.append(node)
        return f"@@raw{len(raws) - 1}@@"
    if isinstance(node, dict):
        return {k: _substitute(v, raws, depth_cap) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, raws, depth_cap) for v in node]
    return node


def to_json(obj: Any, *, ascii: bool = True, depth_cap: int | None = None) -> bytes:
    """Compact JSON; NaN and infinities as json.dumps writes them; :class:`Raw` tokens verbatim;
    with ``ascii=False``, raw UTF-8 in which lone surrogates are invalid (surrogatepass)."""
    raws: list[Raw] = []
    tree = _substitute(obj, raws, depth_cap)
    text = json.dumps(tree, allow_nan=True, ensure_ascii=ascii, separators=(",", ":"))
    data = text.encode("utf-8", "surrogatepass")
    for i, raw in enumerate(raws):
        data = data.replace(f'"@@raw{i}@@"'.encode(), raw.text, 1)
    return data


def _frame_parts(obj: Any) -> tuple[Any, list[bytes]]:
    """A message as a binary-frame header (tensor data replaced by buffer indices)."""
    buffers: list[bytes] = []

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if node.keys() == {"dtype", "shape", "data"} and isinstance(node["data"], str):
                try:
                    raw = binascii.a2b_base64(node["data"], strict_mode=True)
                except (binascii.Error, ValueError):
                    return dict(node)  # invalid base64 stays a string (still refused)
                buffers.append(raw)
                return {**node, "data": len(buffers) - 1}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(obj), buffers


def frame(header: Any, buffers: list[bytes], *, head_len: int | None = None) -> bytes:
    head = to_json(header, depth_cap=FRAME_DEPTH_CAP)
    n = len(head) if head_len is None else head_len
    return MAGIC + struct.pack("<I", n) + head + b"".join(buffers)


def to_frame(obj: Any) -> bytes:
    """A well-formed binary frame of ``obj`` (whatever the message inside)."""
    header, buffers = _frame_parts(obj)
    if isinstance(header, dict):
        header["$buffers"] = [len(b) for b in buffers]
    return frame(header, buffers)


# -- values and mutations -------------------------------------------------------------------------


def _bytes(src: Source, n: int) -> bytes:
    """``n`` bytes: zeros, 0xff (NaN for floats) or noise (one choice, however long)."""
    kind = src.int(0, 3)
    if kind == 0:
        return bytes(n)
    if kind == 1:
        return b"\xff" * n
    return random.Random(src.int(0, 2**32)).randbytes(n)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def tensor(src: Source, dtype: str | None = None, shape: list[int] | None = None) -> dict[str, Any]:
    """A tensor dict: mostly consistent, else data of the wrong length, a huge shape with
    little data, invalid base64, or an unknown dtype / malformed shape."""
    dt = dtype if dtype is not None else src.pick(DTYPES)
    if shape is None:
        shape = [src.int(0, 4) for _ in range(src.int(1, 3))]
    size = math.prod(shape) * ITEMSIZE[dt]
    kind = src.int(0, 9)
    if kind <= 5:
        data = _bytes(src, size)
    elif kind == 6:
        data = _bytes(src, max(0, size + src.pick((-8, -1, 1, 3, 8))))
    elif kind == 7:
        shape = src.pick(HUGE_SHAPES)
        data = _bytes(src, src.pick((0, 1, 8, 64)))
    elif kind == 8:
        return {"dtype": dt, "shape": shape, "data": src.pick(BAD_B64)}
    else:
        return {
            "dtype": src.pick(BAD_DTYPES),
            "shape": src.pick(BAD_SHAPES),
            "data": _b64(_bytes(src, 4)),
        }
    return {"dtype": dt, "shape": shape, "data": _b64(data)}


def bad_value(src: Source) -> Any:
    """A value of the wrong type, out of range, odd, huge, or deeply nested."""
    k = src.int(0, 11)
    if k == 0:
        return None
    if k == 1:
        return src.bool()
    if k == 2:
        return src.number(-(2**70), 2**70)
    if k == 3:
        return src.pick(HUGE_INTS)
    if k == 4:
        return src.float()
    if k == 5:
        return src.text(20)
    if k == 6:
        return src.pick(ODD_STRINGS)
    if k == 7:
        return src.pick(RAW_TOKENS)
    if k == 8:
        return src.pick(DEEP)
    if k == 9:
        return [src.number(-(2**70), 2**70) for _ in range(src.int(0, 3))]
    if k == 10:
        return {src.text(5): src.int(-5, 5) for _ in range(src.int(0, 3))}
    return tensor(src)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


def _mutate(src: Source, msg: Any) -> Any:
    """Replace, remove, add or wrap one value anywhere in ``msg`` (edited in place)."""
    path = src.pick(_paths(msg))
    op = src.pick(("replace", "replace", "replace", "delete", "extra", "wrap"))
    if not path:  # the message itself
        return bad_value(src) if op != "extra" or not isinstance(msg, dict) else msg
    parent, key = _get(msg, path[:-1]), path[-1]
    if op == "replace":
        parent[key] = bad_value(src)
    elif op == "delete":
        del parent[key]
    elif op == "extra" and isinstance(parent[key], dict):
        name = src.pick(EXTRA_KEYS) if src.bool() else src.text(8)
        parent[key][name] = bad_value(src)
    elif op == "extra" and isinstance(parent, dict):
        parent[src.pick(EXTRA_KEYS)] = bad_value(src)
    else:  # one level deeper
        parent[key] = [parent[key]] if src.bool() else {"value": parent[key]}
    return msg


def mutated(src: Source, base: Builder) -> Any:
    """A message from ``base`` with one to three values replaced, removed, added or wrapped."""
    msg = base(src)  # builders return fresh objects: no copy needed
    for _ in range(src.int(1, 3)):
        msg = _mutate(src, msg)
    return msg


def _maybe_mutated(src: Source, base: Builder) -> Any:
    return mutated(src, base) if src.bool() else base(src)


# -- payloads -----------------------------------------------------------------------------------


def _broken_frame(src: Source, base: Builder) -> bytes:
    """Binary frames that lie: about the header length, the buffers, or their own shape."""
    msg = _maybe_mutated(src, base)
    header, buffers = _frame_parts(msg)
    good = [len(b) for b in buffers]
    kind = src.int(0, 9)
    if kind == 0:  # the header length field is wrong
        if isinstance(header, dict):
            header["$buffers"] = good
        n = len(to_json(header, depth_cap=FRAME_DEPTH_CAP))
        head_len = src.pick((0, 1, n - 1, n + 1, 2**31, 2**32 - 1))
        return frame(header, buffers, head_len=max(head_len, 0))
    if kind == 1 and isinstance(header, dict):  # a bogus $buffers list
        wrong_sums = ([*good, 1], [n + 1 for n in good] or [1], [n - 1 for n in good], good[:-1])
        header["$buffers"] = src.pick((*BAD_BUFFER_LISTS, *wrong_sums))
        return frame(header, buffers)
    if kind == 2 and isinstance(header, dict):  # no $buffers at all
        return frame(header, buffers)
    if kind == 3:  # tensors pointing at buffers that do not exist, or shapes not a list
        tree = copy.deepcopy(header)
        for node in [_get(tree, path) for path in _paths(tree)]:
            if isinstance(node, dict) and "data" in node and isinstance(node["data"], int):
                node["data"] = src.pick((-1, len(buffers), 2**31, True))
                if src.bool():
                    node["shape"] = src.pick(("1", 3, None, {"0": 1}))
        if isinstance(tree, dict):
            tree["$buffers"] = good
        return frame(tree, buffers)
    data = to_frame(msg)
    if kind == 4:  # truncated anywhere
        return data[: src.int(0, len(data) - 1)]
    if kind == 5:  # trailing bytes
        return data + src.binary(8) + b"\x00"
    if kind == 6:  # a header that is not JSON
        head = src.pick(INVALID_UTF8) if src.bool() else src.binary(20)
        return MAGIC + struct.pack("<I", len(head)) + head
    if kind == 7:  # a header that is JSON but not an object
        head = src.pick((b"[]", b'"x"', b"1", b"null", b"[{}]", b'{"$buffers":[]}'))
        return MAGIC + struct.pack("<I", len(head)) + head
    if kind == 8:  # shorter than the frame header itself
        return MAGIC + src.binary(3)
    return data  # a well-formed frame of a (maybe mutated) message


def _corrupted(src: Source, base: Builder) -> bytes:
    """Raw damage to the JSON text of a message."""
    data = to_json(_maybe_mutated(src, base))
    kind = src.int(0, 5)
    if kind == 0:
        return data[: src.int(0, max(len(data) - 1, 0))]
    if kind == 1:  # invalid UTF-8, most often inside a string
        i = src.pick([m.end() for m in re.finditer(rb'"', data)] or [0])
        return data[:i] + src.pick(INVALID_UTF8) + data[i:]
    if kind == 2 and data:
        i = src.int(0, len(data) - 1)
        return data[:i] + bytes([data[i] ^ src.int(1, 255)]) + data[i + 1 :]
    if kind == 3:
        return data + src.pick((b"}", b",", b"\x00", b" x", b"{}", b"\xff"))
    if kind == 4:
        return src.pick((b"\xef\xbb\xbf", b"\x00", b" ", b"\x00EO", b"\xfe\xff")) + data
    return data[: len(data) // 2] + data  # a message glued to half of itself


def _junk(src: Source) -> bytes:
    """Payloads unrelated to any message: random bytes, other JSON, empty, deep nesting."""
    kind = src.int(0, 3)
    if kind == 0:
        return src.binary(300)
    if kind == 1:
        return to_json(src.json_value())
    if kind == 2:
        return src.pick((b"", b"null", b"[]", b"{}", b'"x"', b"1", b"NaN", b" "))
    return src.pick(DEEP).text


def _oversized(src: Source, base: Builder, limit: int) -> bytes:
    """A valid message padded with trailing whitespace (still valid JSON) to just above
    ``limit`` bytes, or to exactly ``limit`` bytes (which must be accepted)."""
    data = to_json(base(src))
    target = limit + src.pick((1, 1, 2, 100, 4096, 0))
    return data + src.pick((b" ", b"\n", b"\t", b"\r")) * max(target - len(data), 0)


def generate(src: Source, base: Builder, *, limit: int) -> bytes:
    """One payload for a topic whose messages ``base`` builds (size limit ``limit``)."""
    k = src.int(0, 99)
    if k < 12:  # as sent, ids from small pools: duplicates, replays, unknown jobs
        return to_json(base(src))
    if k < 45:
        return to_json(mutated(src, base))
    if k < 52:
        return to_frame(base(src))
    if k < 62:
        return _broken_frame(src, base)
    if k < 76:
        return _corrupted(src, base)
    if k < 84:
        return _junk(src)
    if k < 90:
        return _oversized(src, base, limit)
    return to_json(mutated(src, base), ascii=False)  # raw UTF-8: lone surrogates invalid


# -- messages, as their senders build them -------------------------------------------------------


@dataclass(frozen=True)
class Pools:
    """Small id pools, so that ids recur across payloads."""

    senders: tuple[str, ...] = ("fz-agent",)
    jobs: tuple[str, ...] = ("fz-job-0", "fz-job-1")
    clients: tuple[str, ...] = ("fz-client",)
    # A birth's capabilities as JSON (a real agent's), parsed afresh for every birth.
    capabilities: str = "{}"


def _sometimes(src: Source, msg: dict[str, Any], optional: dict[str, Callable[[], Any]]) -> Any:
    """Add each optional field with probability 1/2 (one choice for all)."""
    mask = src.int(0, 2 ** len(optional) - 1)
    for i, (k, make) in enumerate(optional.items()):
        if mask >> i & 1:
            msg[k] = make()
    return msg


def _seq(src: Source) -> int:
    """A birth sequence number: small, plausible, or (rarely) the largest there are."""
    k = src.int(0, 49)
    if k == 0:
        return 2**64
    if k == 1:
        return 2**63
    return src.int(0, 10) if k < 25 else src.int(0, 2**53)


def _task(src: Source, pools: Pools) -> tuple[str, str]:
    job = src.pick(pools.jobs)
    return job, f"{job}.{src.pick(TASK_SUFFIXES)}"


def _error(src: Source) -> dict[str, Any]:
    return {"code": src.pick(ERROR_CODES), "message": src.text(30)}


def _held(src: Source, pools: Pools, most: int) -> list[list[Any]]:
    return [[_task(src, pools)[1], src.pick(ATTEMPTS)] for _ in range(src.int(0, most))]


def task_result(src: Source, pools: Pools) -> dict[str, Any]:
    job, task = _task(src, pools)
    ok = src.bool()
    msg: dict[str, Any] = {
        "v": 1,
        "type": "result",
        "task_id": task,
        "job_id": job,
        "attempt": src.pick(ATTEMPTS),
        "agent_id": src.pick(pools.senders),
        "ok": ok,
    }
    if ok:
        n = src.int(1, 3)
        msg["outputs"] = {
            "label": tensor(src, "int64", [n]),
            "probabilities": tensor(src, "float32", [n, 10]),
        }
    return _sometimes(
        src,
        msg,
        {"error": lambda: _error(src), "queued_ms": src.finite, "exec_ms": src.finite},
    )


def heartbeat(src: Source, pools: Pools) -> dict[str, Any]:
    msg = {
        "v": 1,
        "type": "heartbeat",
        "agent_id": src.pick(pools.senders),
        "seq": _seq(src),
        "ts": src.finite(),
        "cpu_percent": src.finite(),
        "memory_available": src.number(0, 2**40),
        "running": src.int(0, 10),
        "queued": src.int(0, 10),
        "slots": src.int(1, 8),
        "completed": src.number(0, 10**6),
    }
    return _sometimes(
        src,
        msg,
        {
            "draining": src.bool,
            "active": lambda: _held(src, pools, 3),
            "model_ms": lambda: {"digits-mlp": src.finite()},
            "temperature_c": src.float,
            "battery_percent": src.finite,
        },
    )


def agent_state(src: Source, pools: Pools) -> dict[str, Any]:
    """Births (a real agent's capabilities with drawn slots, costs, encodings) and deaths."""
    online = src.bool()

    def capabilities() -> dict[str, Any]:
        caps = json.loads(pools.capabilities)
        caps["slots"] = src.int(1, 4)
        caps["encodings"] = src.pick((["json"], ["json", "binary"], []))
        for model in caps.get("models", []):
            # Any batch sizes, repeated ones included (they once crashed the cost model).
            batches = [src.int(1, 1024) for _ in range(src.int(0, 3))]
            model["cost"] = [[b, src.finite()] for b in batches]
        return caps

    msg = {
        "v": 1,
        "type": "state",
        "agent_id": src.pick(pools.senders),
        "online": online,
        "seq": _seq(src),
        "ts": src.finite(),
    }
    optional: dict[str, Callable[[], Any]] = {
        "reason": lambda: src.text(20),
        "held": lambda: _held(src, pools, 2),
    }
    if online:
        msg["capabilities"] = capabilities()
    else:
        optional["capabilities"] = capabilities
    return _sometimes(src, msg, optional)


def inference_job(src: Source, pools: Pools) -> dict[str, Any]:
    msg = {
        "v": 1,
        "type": "inference",
        # Mostly ids from the pool (duplicates), sometimes a new job.
        "job_id": src.pick(pools.jobs) if src.int(0, 3) else f"fz-new-{src.int(0, 10**9)}",
        "model": src.pick(("digits-mlp", "digits-mlp", "no-such-model")),
        "inputs": {"input": tensor(src, "float32", [src.int(0, 3), 64])},
    }
    return _sometimes(
        src,
        msg,
        {
            "batch_size": lambda: src.pick((None, 1, 2, 4, 2**64)),
            "policy": lambda: src.pick((None, "earliest_finish", "least_loaded", "round_robin")),
            "priority": lambda: src.number(-(2**70), 2**70),
            "client_id": lambda: src.pick((None, *pools.clients)),
            "result_encoding": lambda: src.pick(("json", "binary")),
            "redundancy": lambda: src.int(1, 9),
            "tolerance": lambda: src.pick((0.0, 1e-6, 0.5, 1.0)),
        },
    )


def task_message(src: Source, pools: Pools) -> dict[str, Any]:
    """``run`` (mostly) and ``cancel`` messages for an agent's tasks topic."""
    job, task = _task(src, pools)
    if src.int(0, 4) == 0:
        return {"v": 1, "type": "cancel", "task_id": task, "attempt": src.pick(ATTEMPTS)}
    return {
        "v": 1,
        "type": "run",
        "task_id": task,
        "job_id": job,
        "attempt": src.pick(ATTEMPTS),
        "model": src.pick(("digits-mlp", "digits-mlp", "no-such-model")),
        "inputs": {"input": tensor(src, "float32", [src.int(0, 3), 64])},
        "lease_until": src.finite(),
        "sent_at": src.finite(),
    }


def job_result(src: Source, pools: Pools) -> dict[str, Any]:
    ok = src.bool()
    msg: dict[str, Any] = {"v": 1, "type": "job_result", "job_id": src.pick(pools.jobs), "ok": ok}
    if ok:
        n = src.int(0, 3)
        msg["outputs"] = {
            "label": tensor(src, "int64", [n]),
            "probabilities": tensor(src, "float32", [n, 10]),
        }
    else:
        msg["error"] = _error(src)
    return _sometimes(
        src,
        msg,
        {
            "model": lambda: "digits-mlp",
            "samples": lambda: src.int(0, 100),
            "tasks": lambda: src.int(0, 100),
            "batch_size": lambda: src.int(0, 100),
            "elapsed_s": src.finite,
            "retries": lambda: src.int(0, 100),
            "per_agent": lambda: {"a-1": {"samples": src.int(0, 9), "tasks": src.int(0, 9)}},
            "disagreements": lambda: {"a-2": src.int(0, 9)},
        },
    )


def job_status(src: Source, pools: Pools) -> dict[str, Any]:
    msg = {
        "v": 1,
        "type": "status",
        "job_id": src.pick(pools.jobs),
        "state": src.pick(JOB_STATES),
        "ts": src.finite(),
    }
    return _sometimes(
        src,
        msg,
        {
            "tasks_total": lambda: src.int(0, 100),
            "tasks_done": lambda: src.int(0, 100),
            "samples_total": lambda: src.int(0, 100),
            "samples_done": lambda: src.int(0, 100),
            "error": lambda: _error(src),
        },
    )


def coordinator_state(src: Source, pools: Pools) -> dict[str, Any]:
    def summary() -> dict[str, Any]:
        return {
            "job_id": src.pick(pools.jobs),
            "state": src.pick(JOB_STATES),
            "model": "digits-mlp",
            "policy": "earliest_finish",
            "samples": src.int(0, 100),
            "tasks_total": src.int(0, 100),
            "tasks_done": src.int(0, 100),
            "retries": src.int(0, 100),
            "elapsed_s": src.finite(),
        }

    msg = {"v": 1, "type": "coordinator", "online": src.bool(), "ts": src.finite()}
    return _sometimes(
        src,
        msg,
        {
            "agents_online": lambda: src.int(0, 9),
            "jobs": lambda: [summary() for _ in range(src.int(0, 2))],
            "counts": lambda: {"dispatched": src.int(0, 9), "rejected_bad_topic": src.int(0, 9)},
        },
    )
