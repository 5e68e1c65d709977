"""Metadata filters answered from an inverted index of metadata values.

Two languages: the original one (``compile_where`` + ``Postings.match``: equality and ``in``,
every key must match) and the full one (``compile_filter`` / ``select``: also ``ne``, ``nin``,
the ranges ``gt``/``gte``/``lt``/``lte``, ``exists``, and the groups ``and``/``or``/``not``),
whose grammar and semantics are described above ``compile_filter``.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Hashable, KeysView, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, cast

from ..errors import InvalidArgument

__all__ = [
    "GROUPS",
    "MAX_FILTER_CLAUSES",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_VALUES",
    "MAX_IN_VALUES",
    "OPERATORS",
    "AllOf",
    "AnyOf",
    "Clause",
    "Condition",
    "Filter",
    "Not",
    "Postings",
    "Selection",
    "compile_filter",
    "compile_where",
    "select",
]

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
    """key -> value -> labels of the live documents with that metadata value.

    For range filters, the distinct number (or string) values of a key are also kept sorted,
    once a range on that key has been asked for (built then, kept up to date after). Building
    happens during a search, possibly in several threads at once: each publishes a complete
    list, and the writes that keep it up to date run alone (the collection's write lock)."""

    def __init__(self) -> None:
        self._by_key: dict[str, dict[Hashable, set[int]]] = {}
        # (key, "n" | "s") -> (its distinct values of that kind in order, their label sets)
        self._sorted: dict[tuple[str, str], tuple[list[Any], list[set[int]]]] = {}
        self._has: dict[str, set[int]] = {}  # key -> labels that have it (built on demand)

    def add(self, label: int, metadata: Mapping[str, Any]) -> None:
        for key, value in metadata.items():
            vkey = _value_key(value)
            if self._has:
                has = self._has.get(key)
                if has is not None:
                    has.add(label)
            values = self._by_key.setdefault(key, {})
            labels = values.get(vkey)
            if labels is None:
                labels = values[vkey] = {label}
                if self._sorted:
                    ordered = self._sorted.get((key, vkey[0]))  # type: ignore[index]
                    if ordered is not None:
                        at = bisect.bisect_left(ordered[0], vkey[1])  # type: ignore[index]
                        ordered[0].insert(at, vkey[1])  # type: ignore[index]
                        ordered[1].insert(at, labels)
            else:
                labels.add(label)

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
            if self._has:
                has = self._has.get(key)
                if has is not None:
                    has.discard(label)
            if not labels:
                del values[vkey]
                if self._sorted:
                    ordered = self._sorted.get((key, vkey[0]))  # type: ignore[index]
                    if ordered is not None:
                        at = bisect.bisect_left(ordered[0], vkey[1])  # type: ignore[index]
                        del ordered[0][at], ordered[1][at]
                if not values:
                    del self._by_key[key]
                    self._sorted.pop((key, "n"), None)
                    self._sorted.pop((key, "s"), None)
                    self._has.pop(key, None)

    def has(self, key: str) -> set[int]:
        """Labels of the documents that have ``key``. Never mutate it."""
        has = self._has.get(key)
        if has is None:
            by_value = self._by_key.get(key)
            if not by_value:
                return set()  # nothing cached for absent keys
            has = set().union(*by_value.values())
            self._has[key] = has
        return has

    def sorted_values(self, key: str, kind: str) -> tuple[list[Any], list[set[int]]]:
        """The distinct values of ``key`` tagged ``kind`` ("n" numbers, "s" strings) in
        order, and the labels of each. Never mutate them."""
        ordered = self._sorted.get((key, kind))
        if ordered is None:
            by_value = self._by_key.get(key)
            if not by_value:
                return [], []  # nothing cached for absent keys
            pairs = sorted(
                ((vkey[1], labels) for vkey, labels in by_value.items() if vkey[0] == kind),  # type: ignore[index]
                key=operator.itemgetter(0),
            )
            ordered = ([value for value, _ in pairs], [labels for _, labels in pairs])
            self._sorted[(key, kind)] = ordered
        return ordered

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


# -- the full filter language ---------------------------------------------------------------------
#
# compile_where/Postings.match above answer the original language (equality and ``in``, AND
# of keys) and stay as they are for their callers. The full language:
#
#   where     := {key: condition, ..., "and": [where, ...], "or": [where, ...], "not": where}
#                (every entry must hold: AND; "and", "or" and "not" are group operators, not
#                metadata keys)
#   condition := value                                   equality
#              | {op: operand, ...}                      every operator must hold
#   op        := eq | ne | in | nin | gt | gte | lt | lte | exists
#
# Values are None, bool, int, float, str or bytes; 1 == 1.0 but True != 1. ``ne``, ``nin``
# and the ranges only match documents that have the key (as in SQL, a missing value is not
# "not equal"); ``{"not": where}`` is the plain complement and ``{"exists": false}`` matches
# documents without the key, ``{"exists": true}`` those with it, whatever its value (None
# too). Ranges take numbers or strings (strings compare by code point); a number bound never
# matches a string value, nor a string bound a number, bool or None. Several operators for
# one key must all hold: {"year": {"gte": 2020, "lt": 2025}}.

# Bounds on one filter. Each condition may cost a pass over the documents that have its key
# (about 25 ms at 100k documents with distinct values), so their number is bounded.
MAX_FILTER_DEPTH = 8  # nesting of and/or/not
MAX_FILTER_CLAUSES = 64  # operators, values to equal, and groups
MAX_FILTER_VALUES = 4096  # values in all the in/nin lists (each list at most MAX_IN_VALUES)
# Checking one document against one filter costs about as much as this many steps of
# select() (a value looked at, a posting set joined): measured at 100k documents.
PER_DOC_COST = 4
OPERATORS = ("eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "exists")
GROUPS = ("and", "or", "not")
_RANGES = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
_NO_VALUE: Any = object()

MetadataOf = Callable[[int], Mapping[str, Any]]
Universe = AbstractSet[int] | KeysView[int]


def _path_text(path: tuple[Any, ...]) -> str:
    return "filter" + "".join(f"[{part!r:.60}]" for part in path)


def _error(message: str, path: tuple[Any, ...], key: Any) -> InvalidArgument:
    shown = key if isinstance(key, str) else repr(key)
    return InvalidArgument(
        f"{_path_text(path)} {message}", argument="filter", key=shown[:200], path=_path_text(path)
    )


def _scalar_key(value: Any, path: tuple[Any, ...], key: str) -> Hashable:
    if isinstance(value, float) and math.isnan(value):
        raise _error("must not be NaN", path, key)
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return _value_key(value)
    raise _error(
        f"must be a value (None, bool, number, string or bytes), got {type(value).__name__}",
        path,
        key,
    )


class Filter:
    """A compiled filter: ``matches`` answers for one document's metadata, ``select`` for a
    whole collection from its Postings."""

    __slots__ = ()

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    def select(self, ctx: _Context) -> AbstractSet[int]:
        """The matching labels of ``ctx.universe``; may be a set owned by the Postings:
        never mutate it."""
        raise NotImplementedError

    def cost(self, ctx: _Context) -> int:
        """A rough count of the steps select() takes, to order the members of an AND."""
        raise NotImplementedError

    @property
    def indexed(self) -> bool:
        """True when select() is a few lookups in the postings (equality and ``in``)."""
        return False


class Condition(Filter):
    """Every operator given for one key."""

    __slots__ = ("bounds", "excluded", "exists", "key", "kind", "values")

    def __init__(
        self,
        key: str,
        values: frozenset[Hashable] | None,
        excluded: frozenset[Hashable],
        bounds: tuple[tuple[str, Any], ...],
        kind: str | None,
        exists: bool | None,
    ) -> None:
        self.key = key
        self.values = values  # from eq/in: the value must be one of these (None: any)
        self.excluded = excluded  # from ne/nin: the value must be none of these
        self.bounds = bounds  # from gt/gte/lt/lte: (operator, bound), all must hold
        self.kind = kind  # "n" or "s": the value tag the bounds compare with
        self.exists = exists

    @property
    def indexed(self) -> bool:
        return self.values is not None and self.exists is not False

    def _value_ok(self, vkey: Hashable) -> bool:
        if self.values is not None and vkey not in self.values:
            return False
        if self.excluded and vkey in self.excluded:
            return False
        if self.bounds:
            tag, value = cast("tuple[str, Any]", vkey)
            if tag != self.kind:
                return False
            for op, bound in self.bounds:
                if not _RANGES[op](value, bound):
                    return False
        return True

    @property
    def _needs_value(self) -> bool:
        return self.values is not None or bool(self.excluded) or bool(self.bounds)

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        value = metadata.get(self.key, _NO_VALUE)
        if value is _NO_VALUE:
            return self.exists is False and not self._needs_value
        if self.exists is False:
            return False
        try:
            vkey = _value_key(value)
        except InvalidArgument:  # not a scalar: validated metadata never holds one
            return False
        return self._value_ok(vkey)

    def select(self, ctx: _Context) -> AbstractSet[int]:
        postings = ctx.postings
        by_value = postings._by_key.get(self.key)
        if not by_value:  # nobody has the key
            if self.exists is False and not self._needs_value:
                return ctx.universe_set()
            return set()
        if self.exists is False:
            if self._needs_value:
                return set()
            return ctx.universe_set() - postings.has(self.key)
        if self.values is not None:
            sets = [by_value[v] for v in self.values if v in by_value and self._value_ok(v)]
        elif self.bounds:
            assert self.kind is not None
            ordered, label_sets = postings.sorted_values(self.key, self.kind)
            lo, hi = self._slice(ordered)
            sets = label_sets[lo:hi]
            if self.excluded:
                kind, excluded = self.kind, self.excluded
                sets = [
                    labels
                    for value, labels in zip(ordered[lo:hi], sets, strict=True)
                    if (kind, value) not in excluded
                ]
        else:  # exists, ne, nin: every document with the key, less the excluded values
            has = postings.has(self.key)
            gone = [by_value[v] for v in self.excluded if v in by_value]
            if not gone:
                return has
            return has.difference(*gone)
        if not sets:
            return set()
        return sets[0] if len(sets) == 1 else set().union(*sets)

    def _slice(self, ordered: list[Any]) -> tuple[int, int]:
        """The part of the sorted distinct values that the bounds let through."""
        lo, hi = 0, len(ordered)
        for op, bound in self.bounds:
            if op == "gt":
                lo = max(lo, bisect.bisect_right(ordered, bound))
            elif op == "gte":
                lo = max(lo, bisect.bisect_left(ordered, bound))
            elif op == "lt":
                hi = min(hi, bisect.bisect_left(ordered, bound))
            else:
                hi = min(hi, bisect.bisect_right(ordered, bound))
        return lo, max(lo, hi)

    def cost(self, ctx: _Context) -> int:
        if self.values is not None and self.exists is not False:
            return len(self.values)
        if self.bounds and (self.key, self.kind) in ctx.postings._sorted:
            lo, hi = self._slice(ctx.postings._sorted[(self.key, self.kind)][0])  # type: ignore[index]
            return hi - lo + 1
        by_value = ctx.postings._by_key.get(self.key, {})
        if self.bounds:
            return len(by_value)
        # A set difference over the documents with the key (in C: a fraction of a step each).
        return len(self.excluded) + ctx.universe_len() // 8

    def __repr__(self) -> str:
        return f"Condition({self.key!r})"


class AllOf(Filter):
    __slots__ = ("children",)

    def __init__(self, children: list[Filter]) -> None:
        self.children = children

    @property
    def indexed(self) -> bool:
        return all(child.indexed for child in self.children)

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return all(child.matches(metadata) for child in self.children)

    def select(self, ctx: _Context) -> AbstractSet[int]:
        costs = [child.cost(ctx) for child in self.children]
        order = sorted(range(len(costs)), key=costs.__getitem__)  # cheapest first
        left = sum(costs)
        result: AbstractSet[int] | None = None
        for i, n in enumerate(order):
            if result is not None and ctx.per_doc_pays(len(result), len(order) - i, left):
                # Few candidates left: checking each is cheaper than scanning the postings.
                rest = [self.children[m] for m in order[i:]]
                return ctx.check_each(result, rest)
            left -= costs[n]
            found = self.children[n].select(ctx)
            if result is None:
                result = found
            elif len(found) < len(result):
                result = found & result
            else:
                result = result & found
            if not result:
                return set()
        return set() if result is None else result

    def cost(self, ctx: _Context) -> int:
        return min(child.cost(ctx) for child in self.children)


class AnyOf(Filter):
    __slots__ = ("children",)

    def __init__(self, children: list[Filter]) -> None:
        self.children = children

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return any(child.matches(metadata) for child in self.children)

    def select(self, ctx: _Context) -> AbstractSet[int]:
        sets = [found for child in self.children if (found := child.select(ctx))]
        if not sets:
            return set()
        return sets[0] if len(sets) == 1 else set().union(*sets)

    def cost(self, ctx: _Context) -> int:
        return sum(child.cost(ctx) for child in self.children)


class Not(Filter):
    __slots__ = ("child",)

    def __init__(self, child: Filter) -> None:
        self.child = child

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        return not self.child.matches(metadata)

    def select(self, ctx: _Context) -> AbstractSet[int]:
        return ctx.universe_set() - self.child.select(ctx)

    def cost(self, ctx: _Context) -> int:
        return self.child.cost(ctx) + ctx.universe_len()


class _Context:
    """What select() reads: the postings, the live labels, and optionally each label's
    metadata (for checking a few candidates one by one)."""

    __slots__ = ("metadata_of", "per_doc", "postings", "universe")

    def __init__(
        self,
        postings: Postings,
        universe: Universe,
        metadata_of: MetadataOf | None,
        per_doc: int | None,
    ) -> None:
        self.postings = postings
        self.universe = universe
        self.metadata_of = metadata_of
        self.per_doc = per_doc

    def per_doc_pays(self, candidates: int, filters: int, cost: int) -> bool:
        """Check ``candidates`` documents one by one against ``filters`` filters rather than
        select() them (``cost`` steps) from the postings? ``per_doc`` (tests) fixes the line."""
        if self.metadata_of is None:
            return False
        if self.per_doc is not None:
            return candidates <= self.per_doc
        return candidates * filters * PER_DOC_COST <= cost

    def check_each(self, labels: AbstractSet[int], filters: list[Filter]) -> set[int]:
        metadata_of = self.metadata_of
        assert metadata_of is not None
        out = set()
        for label in labels:
            metadata = metadata_of(label)
            if all(flt.matches(metadata) for flt in filters):
                out.add(label)
        return out

    def universe_set(self) -> AbstractSet[int]:
        return self.universe

    def universe_len(self) -> int:
        return len(self.universe)


# -- compiling ------------------------------------------------------------------------------------


class _Budget:
    __slots__ = ("clauses", "values")

    def __init__(self) -> None:
        self.clauses = MAX_FILTER_CLAUSES
        self.values = MAX_FILTER_VALUES

    def clause(self, path: tuple[Any, ...], key: Any) -> None:
        self.clauses -= 1
        if self.clauses < 0:
            raise _error(
                f"makes the filter too large: at most {MAX_FILTER_CLAUSES} conditions (an"
                " operator or a value to equal) and groups in all",
                path,
                key,
            )

    def spend_values(self, n: int, path: tuple[Any, ...], key: Any) -> None:
        self.values -= n
        if self.values < 0:
            raise _error(
                f"makes the filter too large: at most {MAX_FILTER_VALUES} in/nin values in all",
                path,
                key,
            )


def compile_filter(where: Mapping[str, Any] | None) -> Filter | None:
    """Validate and compile a filter (see the grammar above); None or {} -> None (no filter).

    Every problem is an InvalidArgument whose data names ``argument="filter"``, the ``key``
    at fault (a metadata key, an operator or a group) and its ``path`` in the filter."""
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise InvalidArgument(
            f"filter must be a map, got {type(where).__name__}", argument="filter", path="filter"
        )
    if not where:
        return None
    return _compile_where(where, (), 1, _Budget())


def _compile_where(
    where: Mapping[Any, Any], path: tuple[Any, ...], depth: int, budget: _Budget
) -> Filter:
    if depth > MAX_FILTER_DEPTH:
        raise _error(f"nests and/or/not deeper than {MAX_FILTER_DEPTH} levels", path, path[-1])
    members: list[Filter] = []
    for key, condition in where.items():
        here = (*path, key)
        if not isinstance(key, str) or not key:
            raise _error(f"keys must be non-empty strings, got {key!r:.80}", path, key)
        if key in GROUPS:
            budget.clause(here, key)
        if key in ("and", "or"):
            if isinstance(condition, (str, bytes)) or not isinstance(condition, (list, tuple)):
                raise _error(
                    f"must be a list of filters, got {type(condition).__name__}", here, key
                )
            if not condition:
                raise _error("must not be empty", here, key)
            children = []
            for i, item in enumerate(condition):
                children.append(_compile_group_item(item, (*here, i), depth + 1, budget, key))
            group: Filter = AllOf(children) if key == "and" else AnyOf(children)
            members.append(children[0] if len(children) == 1 else group)
        elif key == "not":
            members.append(Not(_compile_group_item(condition, here, depth + 1, budget, key)))
        else:
            members.append(_compile_condition(key, condition, here, budget))
    return members[0] if len(members) == 1 else AllOf(members)


def _compile_group_item(
    item: Any, path: tuple[Any, ...], depth: int, budget: _Budget, key: str
) -> Filter:
    if not isinstance(item, Mapping):
        raise _error(f"must be a filter (a map), got {type(item).__name__}", path, key)
    if not item:
        raise _error("must not be an empty filter", path, key)
    return _compile_where(item, path, depth, budget)


def _compile_condition(
    key: str, condition: Any, path: tuple[Any, ...], budget: _Budget
) -> Condition:
    if not isinstance(condition, Mapping):
        if isinstance(condition, (list, tuple, set, frozenset)):
            raise _error(
                f"must be a value or a map of operators, got {type(condition).__name__}"
                " (use {'in': [...]} for any of several values)",
                path,
                key,
            )
        budget.clause(path, key)
        return Condition(
            key, frozenset([_scalar_key(condition, path, key)]), frozenset(), (), None, None
        )
    if not condition:
        raise _error(f"names no operator; use one of {', '.join(OPERATORS)}", path, key)
    values: frozenset[Hashable] | None = None
    excluded: set[Hashable] = set()
    bounds: list[tuple[str, Any]] = []
    kind: str | None = None
    exists: bool | None = None
    for op, operand in condition.items():
        here = (*path, op)
        if op not in OPERATORS:
            raise _error(
                f"is not an operator; use one of {', '.join(OPERATORS)}"
                " (and, or, not are groups of filters, not operators of a key)",
                here,
                key,
            )
        budget.clause(here, key)
        if op in ("eq", "ne"):
            vkey = _scalar_key(operand, here, key)
            if op == "eq":
                values = frozenset([vkey]) if values is None else values & {vkey}
            else:
                excluded.add(vkey)
        elif op in ("in", "nin"):
            if isinstance(operand, (str, bytes)) or not isinstance(operand, (list, tuple)):
                raise _error(f"must be a list of values, got {type(operand).__name__}", here, key)
            if len(operand) > MAX_IN_VALUES:
                raise _error(f"has {len(operand)} values; the limit is {MAX_IN_VALUES}", here, key)
            budget.spend_values(len(operand), here, key)
            keys = frozenset(_scalar_key(v, (*here, i), key) for i, v in enumerate(operand))
            if op == "in":
                values = keys if values is None else values & keys
            else:
                excluded |= keys
        elif op == "exists":
            if not isinstance(operand, bool):
                raise _error(f"must be true or false, got {type(operand).__name__}", here, key)
            if exists is not None and exists != operand:
                raise _error("cannot be both true and false", here, key)
            exists = operand
        else:
            if isinstance(operand, bool) or not isinstance(operand, (int, float, str)):
                raise _error(
                    f"must be a number or a string, got {type(operand).__name__}", here, key
                )
            if isinstance(operand, float) and math.isnan(operand):
                raise _error("must not be NaN", here, key)
            this = "s" if isinstance(operand, str) else "n"
            if kind is not None and kind != this:
                raise _error("mixes number and string bounds; a value cannot be both", here, key)
            kind = this
            bounds.append((op, operand))
    return Condition(key, values, frozenset(excluded), tuple(bounds), kind, exists)


# -- answering ------------------------------------------------------------------------------------


class Selection:
    """What a filter selects in one state of a collection: ``labels`` (the exact set, built
    on first use from the postings) and ``allowed(label)`` (a predicate: from ``labels``
    once built or when cheap, else checked on the document's own metadata, which is cheaper
    when only a few labels are asked about, e.g. the ranked rows of a keyword search).

    Valid while the collection does not change (hold its read lock while using it)."""

    def __init__(
        self,
        flt: Filter,
        postings: Postings,
        universe: Universe,
        metadata_of: MetadataOf | None = None,
        *,
        per_doc: int | None = None,
    ) -> None:
        self.filter = flt
        self._ctx = _Context(postings, universe, metadata_of, per_doc)
        self._labels: AbstractSet[int] | None = None

    @property
    def labels(self) -> AbstractSet[int]:
        """The matching labels. Never mutate: it may be a set owned by the postings."""
        if self._labels is None:
            self._labels = self.filter.select(self._ctx)
        return self._labels

    def __len__(self) -> int:
        return len(self.labels)

    def allowed(self, label: int) -> bool:
        if self._labels is None and (self._ctx.metadata_of is None or self.filter.indexed):
            self.labels  # noqa: B018 - built once, then a set lookup
        if self._labels is not None:
            return label in self._labels
        if label not in self._ctx.universe:
            return False
        assert self._ctx.metadata_of is not None
        return self.filter.matches(self._ctx.metadata_of(label))


def select(
    where: Mapping[str, Any] | Filter | None,
    postings: Postings,
    universe: Universe,
    metadata_of: MetadataOf | None = None,
) -> Selection | None:
    """The one entry point for a collection: validate and compile ``where`` (typed
    InvalidArgument errors) and bind it to the collection's postings, live labels
    (``universe``, e.g. ``memory.by_label.keys()``) and metadata (``metadata_of(label)``);
    None when there is no filter."""
    flt = where if isinstance(where, Filter) else compile_filter(where)
    if flt is None:
        return None
    return Selection(flt, postings, universe, metadata_of)
