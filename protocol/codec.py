"""Wire encodings: JSON (the default, for any MQTT client) and a binary frame for tensor messages.

A binary frame is ``MAGIC | u32 header length | header | buffer 0 | buffer 1 | ...``: the
header is the message's JSON with every tensor's ``data`` replaced by the index of its
raw little-endian buffer, and ``"$buffers"`` listing the buffers' lengths. It saves the
base64 pass on each side and a third of the bytes; the message is validated by the same
pydantic model either way. JSON never starts with a NUL byte, so a receiver tells the two
apart by the first byte.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from protocol._base import Message, summarize
from protocol.errors import ProtocolError

Encoding = Literal["json", "binary"]
ENCODINGS: tuple[Encoding, ...] = ("json", "binary")
MAGIC = b"\x00EOB"
_HEADER = struct.Struct("<4sI")
# A job result of a model without a batch axis carries a tensor per output and item; the
# header lists one length per buffer, so its size (bounded by the payload limit) bounds
# the work anyway.
MAX_BUFFERS = 65536
# Below this many bytes of tensors, pydantic's JSON is the faster encoding. Measured:
# encoding + decoding a RunTask takes 3 + 8 us in JSON and 16 + 8 us as a binary frame at
# 1 digits sample (256 B); 6 + 21 against 12 + 13 us at 8 samples (2 KiB).
BINARY_MIN_BYTES = 2048

M = TypeVar("M", bound=Message)


def is_binary(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def encode(msg: Message, encoding: Encoding = "json") -> bytes:
    """Serialize ``msg`` in ``encoding``."""
    if encoding == "json":
        return msg.to_json()
    buffers: list[bytes] = []
    header = _extract(msg.model_dump(mode="python", exclude_none=True), buffers)
    header["$buffers"] = [len(b) for b in buffers]
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_HEADER.pack(MAGIC, len(head)), head, *buffers])


def decode(cls: type[M], payload: bytes) -> M:
    """Parse ``payload`` (JSON or a binary frame) into ``cls``, strictly."""
    if not is_binary(payload):
        return cls.from_json(payload)
    try:
        return cls.model_validate(unframe(payload), strict=True)
    except ValidationError as e:
        raise ProtocolError(f"invalid {cls.__name__}: {summarize(e)}", code="malformed") from None


def unframe(payload: bytes) -> dict[str, Any]:
    """The message of a binary frame as a dict, buffers in place of tensor data."""
    if len(payload) < _HEADER.size:
        raise ProtocolError("binary frame shorter than its header", code="malformed")
    _, head_len = _HEADER.unpack_from(payload)
    start = _HEADER.size + head_len
    if start > len(payload):
        raise ProtocolError("binary frame truncated inside its header", code="malformed")
    try:
        header = json.loads(payload[_HEADER.size : start])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"binary frame header is not JSON: {e}", code="malformed") from None
    except RecursionError:
        raise ProtocolError("binary frame header nests too deeply", code="malformed") from None
    lengths = header.pop("$buffers", None) if isinstance(header, dict) else None
    if (
        not isinstance(lengths, list)
        or len(lengths) > MAX_BUFFERS
        or not all(isinstance(n, int) and n >= 0 for n in lengths)
    ):
        raise ProtocolError("binary frame header lacks a valid $buffers list", code="malformed")
    if start + sum(lengths) != len(payload):
        raise ProtocolError(
            f"binary frame holds {len(payload) - start} buffer bytes, header says {sum(lengths)}",
            code="malformed",
        )
    buffers = []
    offset = start
    for n in lengths:
        buffers.append(payload[offset : offset + n])
        offset += n
    try:
        result = _insert(header, buffers)
    except RecursionError:
        raise ProtocolError("binary frame header nests too deeply", code="malformed") from None
    if not isinstance(result, dict):
        raise ProtocolError("binary frame header is not an object", code="malformed")
    return result


def _is_tensor(node: dict[str, Any]) -> bool:
    return node.keys() == {"dtype", "shape", "data"}


def _extract(node: Any, buffers: list[bytes]) -> Any:
    if isinstance(node, dict):
        if _is_tensor(node) and isinstance(node["data"], bytes):
            buffers.append(node["data"])
            return {"dtype": node["dtype"], "shape": node["shape"], "data": len(buffers) - 1}
        return {k: _extract(v, buffers) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_extract(v, buffers) for v in node]
    return node


def _insert(node: Any, buffers: list[bytes]) -> Any:
    if isinstance(node, dict):
        if _is_tensor(node) and isinstance(node["data"], int):
            index, shape = node["data"], node["shape"]
            if not 0 <= index < len(buffers) or not isinstance(shape, list):
                raise ProtocolError("binary frame tensor refers to no buffer", code="malformed")
            return {"dtype": node["dtype"], "shape": tuple(shape), "data": buffers[index]}
        return {k: _insert(v, buffers) for k, v in node.items()}
    if isinstance(node, list):
        return [_insert(v, buffers) for v in node]
    return node
