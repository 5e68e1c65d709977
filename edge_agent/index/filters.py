"""Metadata filters (equality and ``in``) answered from an inverted index of metadata values."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from ..errors import InvalidArgument

__all__ = ["Clause", "Postings", "compile_where"]

# key -> values that pass; a document passes when every clause passes (AND).
Clause = tuple[str, frozenset[Hashable]]
MAX_IN_VALUES = 1024


def _value_key(value: Any) -> Hashable:
    """Type-tagged so True does not match 1 (Python hashes them alike); 1 and 1.0 do match."""
    if value is None:
        return ("z", None)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes):
        return ("y", value)
    raise InvalidArgument(f"filter values must be scalars, got {type(value).__name__}")


def compile_where(where: Mapping[str, Any] | None) -> list[Clause] | None:
    """``{"lang": "en", "tag": {"in": ["a", "b"]}}`` -> clauses; None or {} -> no filter.

    A scalar means equality, ``{"eq": v}`` the same, ``{"in": [...]}`` membership.
    """
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise InvalidArgument(f"where must be a map, got {type(where).__name__}")
    clauses: list[Clause] = []
    for key, condition in where.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"where keys must be non-empty strings, got {key!r:.80}")
        if isinstance(condition, Mapping):
            if len(condition) != 1 or next(iter(condition)) not in ("eq", "in"):
                raise InvalidArgument(
                    f"where[{key!r}] must be a value, {{'eq': value}} or {{'in': [values]}}"
                )
            operator, operand = next(iter(condition.items()))
            if operator == "eq":
                values = frozenset([_value_key(operand)])
            else:
                if isinstance(operand, (str, bytes)) or not isinstance(operand, (list, tuple)):
                    raise InvalidArgument(f"where[{key!r}]['in'] must be a list of values")
                if len(operand) > MAX_IN_VALUES:
                    raise InvalidArgument(f"where[{key!r}]['in'] has over {MAX_IN_VALUES} values")
                values = frozenset(_value_key(v) for v in operand)
        else:
            values = frozenset([_value_key(condition)])
        clauses.append((key, values))
    return clauses or None


class Postings:
    """key -> value -> labels of the live documents with that metadata value."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[Hashable, set[int]]] = {}

    def add(self, label: int, metadata: Mapping[str, Any]) -> None:
        for key, value in metadata.items():
            self._by_key.setdefault(key, {}).setdefault(_value_key(value), set()).add(label)

    def remove(self, label: int, metadata: Mapping[str, Any]) -> None:
        for key, value in metadata.items():
            values = self._by_key.get(key)
            if values is None:
                continue
            vkey = _value_key(value)
            labels = values.get(vkey)
            if labels is None:
                continue
            labels.discard(label)
            if not labels:
                del values[vkey]
                if not values:
                    del self._by_key[key]

    def match(self, clauses: list[Clause]) -> set[int]:
        """Labels passing every clause. Never mutate the result: it may be our own set."""
        groups: list[set[int]] = []
        for key, values in clauses:
            by_value = self._by_key.get(key, {})
            sets = [by_value[v] for v in values if v in by_value]
            if not sets:
                return set()
            groups.append(sets[0] if len(sets) == 1 else set().union(*sets))
        groups.sort(key=len)
        result = groups[0]
        for other in groups[1:]:
            result = result & other
            if not result:
                break
        return result
