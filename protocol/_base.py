"""Base class of every wire message: immutable, strict, versioned."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from protocol.errors import ProtocolError

SCHEMA_VERSION = 1

M = TypeVar("M", bound="Message")


class Message(BaseModel):
    """Immutable pydantic model; unknown fields are refused, types are not coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls: type[M], payload: bytes | bytearray | str) -> M:
        """Parse and validate; any failure becomes a :class:`ProtocolError` with a short reason."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError as e:
            raise ProtocolError(
                f"invalid {cls.__name__}: {summarize(e)}", code="malformed"
            ) from None


def summarize(error: ValidationError, limit: int = 3) -> str:
    """A one-line, bounded description of a validation error (never echoes whole payloads)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False)[:limit]:
        loc = ".".join(str(p) for p in item["loc"]) or "<root>"
        parts.append(f"{loc}: {item['msg']}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)
