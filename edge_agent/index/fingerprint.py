"""What a collection's vectors were made with. Vectors from another model are not comparable."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidArgument

__all__ = ["ModelFingerprint"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModelFingerprint:
    """Model name, weights file sha256, native dims, pooling, and the ``dimensions`` option.

    Plain values, so the index never imports the embedder. The service builds it from the
    resolved model: ``ModelFingerprint(manifest.name, manifest.files[quant].sha256,
    manifest.dims, manifest.pooling, dimensions)``.
    """

    model: str
    sha256: str
    dims: int
    pooling: str
    dimensions: int | None = None  # Matryoshka output size; None = the full dims

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or len(self.model) > 256:
            raise InvalidArgument(f"fingerprint model must be a non-empty name, got {self.model!r}")
        if not isinstance(self.sha256, str) or not _SHA256.match(self.sha256):
            raise InvalidArgument(f"fingerprint sha256 must be 64 hex digits, got {self.sha256!r}")
        if (
            not isinstance(self.dims, int)
            or isinstance(self.dims, bool)
            or not 1 <= self.dims <= 65536
        ):
            raise InvalidArgument(f"fingerprint dims must be in [1, 65536], got {self.dims!r}")
        if not isinstance(self.pooling, str) or not self.pooling:
            raise InvalidArgument(f"fingerprint pooling must be a name, got {self.pooling!r}")
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int)
            or isinstance(self.dimensions, bool)
            or not 1 <= self.dimensions <= self.dims
        ):
            raise InvalidArgument(
                f"fingerprint dimensions must be in [1, {self.dims}], got {self.dimensions!r}"
            )

    @property
    def vector_dims(self) -> int:
        """Length of the vectors this model produces with these options."""
        return self.dimensions if self.dimensions is not None else self.dims

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ModelFingerprint:
        if not isinstance(data, dict):
            raise InvalidArgument(f"fingerprint must be a map, got {type(data).__name__}")
        try:
            return cls(
                model=data["model"],
                sha256=data["sha256"],
                dims=data["dims"],
                pooling=data["pooling"],
                dimensions=data.get("dimensions"),
            )
        except KeyError as exc:
            raise InvalidArgument(f"fingerprint lacks {exc.args[0]!r}") from exc

    def describe(self) -> str:
        size = f"{self.vector_dims}d" + (
            f" of {self.dims}" if self.vector_dims != self.dims else ""
        )
        return f"{self.model} ({self.sha256[:12]}, {size}, {self.pooling} pooling)"

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Human-readable field differences, for the mismatch message."""
        return [
            f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in ("model", "sha256", "dims", "pooling", "dimensions")
            if getattr(self, name) != getattr(other, name)
        ]
