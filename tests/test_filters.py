"""Metadata filters: every operator, groups, typed errors, and a property test against a
plain-Python model of the semantics."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import InvalidArgument
from edge_agent.index.filters import (
    MAX_FILTER_CLAUSES,
    MAX_FILTER_DEPTH,
    MAX_FILTER_VALUES,
    MAX_IN_VALUES,
    Postings,
    Selection,
    compile_filter,
    compile_where,
    select,
)

DOCS: dict[int, dict[str, Any]] = {
    0: {"lang": "en", "year": 2019, "score": 0.5, "tag": "a"},
    1: {"lang": "en", "year": 2020, "score": 1.0, "draft": True},
    2: {"lang": "fr", "year": 2021.0, "tag": "b", "draft": False},
    3: {"lang": "de", "year": 2024, "tag": None},
    4: {"lang": "fr", "year": "2022", "blob": b"\x00"},
    5: {"year": 2025, "draft": 1},
    6: {},
}


def postings_of(docs: dict[int, dict[str, Any]]) -> Postings:
    postings = Postings()
    for label, metadata in docs.items():
        postings.add(label, metadata)
    return postings


def run(where: Any, docs: dict[int, dict[str, Any]] = DOCS) -> set[int]:
    """The labels matching ``where``, checked three ways that must agree."""
    flt = compile_filter(where)
    assert flt is not None
    by_doc = {label for label, metadata in docs.items() if flt.matches(metadata)}
    postings = postings_of(docs)
    universe = docs.keys()
    by_postings = set(Selection(flt, postings, universe).labels)
    mixed = set(Selection(flt, postings, universe, docs.__getitem__, per_doc=10**9).labels)
    assert by_doc == by_postings == mixed, (where, by_doc, by_postings, mixed)
    return by_doc


# -- operators -------------------------------------------------------------------------------------


def test_equality_and_in_as_before() -> None:
    assert run({"lang": "en"}) == {0, 1}
    assert run({"lang": {"eq": "fr"}}) == {2, 4}
    assert run({"lang": {"in": ["de", "fr"]}}) == {2, 3, 4}
    assert run({"lang": "en", "year": 2020}) == {1}
    assert run({"year": 2021}) == {2}  # 2021 == 2021.0
    assert run({"draft": True}) == {1}  # True is not 1
    assert run({"draft": 1}) == {5}
    assert run({"tag": None}) == {3}
    assert run({"blob": b"\x00"}) == {4}
    assert run({"lang": {"in": []}}) == set()
    assert compile_filter(None) is None
    assert compile_filter({}) is None


def test_ne_and_nin_need_the_key() -> None:
    assert run({"lang": {"ne": "en"}}) == {2, 3, 4}  # 5 and 6 have no lang
    assert run({"lang": {"nin": ["en", "fr"]}}) == {3}
    assert run({"lang": {"nin": []}}) == {0, 1, 2, 3, 4}
    assert run({"draft": {"ne": True}}) == {2, 5}
    assert run({"tag": {"ne": None}}) == {0, 2}


def test_ranges_on_numbers() -> None:
    assert run({"year": {"gte": 2020, "lt": 2025}}) == {1, 2, 3}  # "2022" is a string
    assert run({"year": {"gt": 2020}}) == {2, 3, 5}
    assert run({"year": {"lte": 2020.0}}) == {0, 1}
    assert run({"year": {"gt": 2019.5, "lte": 2021}}) == {1, 2}
    assert run({"score": {"gt": 0}}) == {0, 1}
    assert run({"draft": {"gte": 0}}) == {5}  # booleans are not numbers
    assert run({"year": {"gt": -math.inf}}) == {0, 1, 2, 3, 5}
    assert run({"year": {"gt": 2030}}) == set()
    assert run({"year": {"gt": 2020, "lt": 2020}}) == set()
    assert run({"year": {"gte": 2**70}}) == set()


def test_ranges_on_strings() -> None:
    assert run({"lang": {"gte": "en"}}) == {0, 1, 2, 4}
    assert run({"lang": {"lt": "en"}}) == {3}
    assert run({"year": {"gte": "2000"}}) == {4}  # only the string value
    assert run({"tag": {"gte": "a", "lt": "b"}}) == {0}


def test_exists() -> None:
    assert run({"tag": {"exists": True}}) == {0, 2, 3}  # None counts as a value
    assert run({"tag": {"exists": False}}) == {1, 4, 5, 6}
    assert run({"nope": {"exists": False}}) == set(DOCS)
    assert run({"nope": {"exists": True}}) == set()
    assert run({"tag": {"exists": False, "ne": "a"}}) == set()  # both cannot hold
    assert run({"tag": {"exists": True, "ne": "a"}}) == {2, 3}


def test_several_operators_all_hold() -> None:
    assert run({"lang": {"in": ["en", "fr"], "ne": "en"}}) == {2, 4}
    assert run({"lang": {"eq": "en", "in": ["fr"]}}) == set()
    assert run({"year": {"nin": [2020], "gte": 2019, "lt": 2022}}) == {0, 2}


def test_groups() -> None:
    assert run({"or": [{"lang": "de"}, {"year": {"gte": 2025}}]}) == {3, 5}
    assert run({"and": [{"lang": "fr"}, {"tag": {"exists": True}}]}) == {2}
    assert run({"not": {"lang": "en"}}) == {2, 3, 4, 5, 6}  # the complement: missing keys too
    assert run({"not": {"lang": {"exists": True}}}) == {5, 6}
    assert run({"lang": "fr", "or": [{"tag": "b"}, {"blob": {"exists": True}}]}) == {2, 4}
    assert run({"or": [{"lang": "en"}], "not": {"year": 2019}}) == {1}
    nested = {"or": [{"and": [{"lang": "en"}, {"not": {"draft": True}}]}, {"year": {"gt": 2023}}]}
    assert run(nested) == {0, 3, 5}
    assert run({"not": {"not": {"lang": "en"}}}) == {0, 1}


def test_depth_limit() -> None:
    where: dict[str, Any] = {"lang": "en"}
    for _ in range(MAX_FILTER_DEPTH - 1):
        where = {"not": where}
    assert run(where) in ({0, 1}, {2, 3, 4, 5, 6})
    with pytest.raises(InvalidArgument) as info:
        compile_filter({"not": where})
    assert "deeper" in info.value.message and info.value.data["argument"] == "filter"
    very_deep: dict[str, Any] = {"lang": "en"}
    for _ in range(10_000):  # refused at depth 9, not by a RecursionError
        very_deep = {"or": [very_deep]}
    with pytest.raises(InvalidArgument):
        compile_filter(very_deep)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "key", "words"),
    [
        ({"year": {"like": "20%"}}, "year", "not an operator"),
        ({"year": {"gt": [2020]}}, "year", "number or a string"),
        ({"year": {"gt": True}}, "year", "number or a string"),
        ({"year": {"gt": None}}, "year", "number or a string"),
        ({"year": {"lt": b"x"}}, "year", "number or a string"),
        ({"year": {"gt": math.nan}}, "year", "NaN"),
        ({"year": {"gte": 2020, "lt": "2025"}}, "year", "mixes"),
        ({"tag": {"exists": 1}}, "tag", "true or false"),
        ({"tag": {"exists": "yes"}}, "tag", "true or false"),
        ({"tag": {"eq": {"a": 1}}}, "tag", "must be a value"),
        ({"tag": {"eq": [1]}}, "tag", "must be a value"),
        ({"tag": {"ne": {"a": 1}}}, "tag", "must be a value"),
        ({"tag": [1, 2]}, "tag", "map of operators"),
        ({"tag": {}}, "tag", "names no operator"),
        ({"tag": {"in": "abc"}}, "tag", "list of values"),
        ({"tag": {"nin": 3}}, "tag", "list of values"),
        ({"tag": {"in": [1, [2]]}}, "tag", "must be a value"),
        ({"tag": {"in": list(range(MAX_IN_VALUES + 1))}}, "tag", "limit"),
        ({"tag": {"nin": list(range(10_000))}}, "tag", "limit"),
        ({"tag": math.nan}, "tag", "NaN"),
        ({"or": []}, "or", "empty"),
        ({"and": []}, "and", "empty"),
        ({"or": {"lang": "en"}}, "or", "list of filters"),
        ({"or": "en"}, "or", "list of filters"),
        ({"or": [{"lang": "en"}, {}]}, "or", "empty filter"),
        ({"or": [{"lang": "en"}, 3]}, "or", "must be a filter"),
        ({"not": []}, "not", "must be a filter"),
        ({"not": {}}, "not", "empty filter"),
        ({"or": [{"year": {"gt": {}}}]}, "year", "number or a string"),
        ({"": 1}, "", "non-empty strings"),
        ({3: 1}, "3", "non-empty strings"),
    ],
)
def test_invalid_filters(where: Any, key: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_filter(where)
    error = info.value
    assert error.data["argument"] == "filter"
    assert error.data["key"] == key
    assert words in error.message
    assert error.message.startswith("filter")
    assert repr(key if key != "3" else 3)[:20] in error.message


@pytest.mark.parametrize("where", [[("lang", "en")], "lang=en", 3])
def test_filter_must_be_a_map(where: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_filter(where)
    assert info.value.data["argument"] == "filter"


def test_error_path_names_the_nested_place() -> None:
    with pytest.raises(InvalidArgument) as info:
        compile_filter({"or": [{"lang": "en"}, {"and": [{"year": {"gt": []}}]}]})
    assert info.value.data["path"] == "filter['or'][1]['and'][0]['year']['gt']"
    assert info.value.data["key"] == "year"


def test_total_size_is_bounded() -> None:
    fine = {"or": [{"k": {"in": list(range(1000))}} for _ in range(4)]}
    assert compile_filter(fine) is not None
    too_many_values = {"or": [{"k": {"in": list(range(1000))}} for _ in range(5)]}
    with pytest.raises(InvalidArgument) as info:
        compile_filter(too_many_values)
    assert str(MAX_FILTER_VALUES) in info.value.message
    assert compile_filter({f"k{i}": i for i in range(MAX_FILTER_CLAUSES)}) is not None
    with pytest.raises(InvalidArgument) as info:
        compile_filter({f"k{i}": i for i in range(MAX_FILTER_CLAUSES + 1)})
    assert str(MAX_FILTER_CLAUSES) in info.value.message
    assert info.value.data["key"] == f"k{MAX_FILTER_CLAUSES}"
    # Groups and each operator count.
    with pytest.raises(InvalidArgument):
        compile_filter(
            {"or": [{"k": {"gt": i, "lt": i + 1}} for i in range(MAX_FILTER_CLAUSES // 2)]}
        )


def test_the_largest_filters_stay_cheap() -> None:
    # Distinct values everywhere: the worst case for a condition that is not an equality.
    docs = {i: {"ts": float(i), "name": f"n{i}"} for i in range(20_000)}
    postings = postings_of(docs)
    n = MAX_FILTER_CLAUSES - 1
    hostile = [
        {"or": [{"ts": {"gte": float(i)}} for i in range(n)]},
        {"and": [{"ts": {"ne": float(i)}} for i in range(n)]},
        {"or": [{"not": {"name": {"exists": True}}} for _ in range(n // 2)]},
        {"and": [{"ts": {"gt": -1.0}} for _ in range(n)]},
    ]
    for where in hostile:
        flt = compile_filter(where)
        assert flt is not None
        for metadata_of in (None, docs.__getitem__):
            start = time.perf_counter()
            Selection(flt, postings, docs.keys(), metadata_of).labels  # noqa: B018
            assert time.perf_counter() - start < 2.0, where


def test_reserved_group_words_with_scalars_are_errors() -> None:
    # "and", "or" and "not" are groups: a metadata key with one of those names cannot be
    # filtered by equality (it used to be, with compile_where, which is unchanged).
    with pytest.raises(InvalidArgument):
        compile_filter({"or": "x"})
    assert compile_where({"or": "x"}) == [("or", frozenset([("s", "x")]))]


# -- the old API is unchanged ----------------------------------------------------------------------


def test_compile_where_and_match_unchanged() -> None:
    postings = postings_of(DOCS)
    clauses = compile_where({"lang": {"in": ["en", "fr"]}, "year": 2021})
    assert clauses is not None
    assert postings.match(clauses) == {2}
    assert compile_where(None) is None and compile_where({}) is None
    with pytest.raises(InvalidArgument):
        compile_where({"lang": {"ne": "en"}})


# -- selection -------------------------------------------------------------------------------------


def test_select_entry_point() -> None:
    postings = postings_of(DOCS)
    assert select(None, postings, DOCS.keys()) is None
    assert select({}, postings, DOCS.keys()) is None
    selection = select({"year": {"gte": 2020}}, postings, DOCS.keys(), DOCS.__getitem__)
    assert selection is not None
    # Before labels are built, allowed() checks the document itself ...
    assert [label for label in range(8) if selection.allowed(label)] == [1, 2, 3, 5]
    assert selection._labels is None
    # ... and after, the set.
    assert set(selection.labels) == {1, 2, 3, 5} and len(selection) == 4
    assert [label for label in range(8) if selection.allowed(label)] == [1, 2, 3, 5]
    # Equality filters use the postings straight away; so does a selection without metadata.
    eq = select({"lang": "en"}, postings, DOCS.keys(), DOCS.__getitem__)
    assert eq is not None and eq.allowed(0) and not eq.allowed(2)
    assert eq._labels is not None
    bare = select({"not": {"lang": "en"}}, postings, DOCS.keys())
    assert bare is not None and bare.allowed(6) and not bare.allowed(0)
    compiled = compile_filter({"lang": "de"})
    assert compiled is not None
    again = select(compiled, postings, DOCS.keys())
    assert again is not None and set(again.labels) == {3}


def test_selection_follows_removals() -> None:
    docs = {label: dict(metadata) for label, metadata in DOCS.items()}
    postings = postings_of(docs)
    postings.remove(0, docs.pop(0))
    postings.remove(3, docs.pop(3))
    flt = compile_filter({"or": [{"lang": "en"}, {"tag": {"exists": False}}]})
    assert flt is not None
    assert set(Selection(flt, postings, docs.keys()).labels) == {1, 4, 5, 6}


def test_and_checks_few_candidates_one_by_one() -> None:
    docs = {i: {"group": i % 100, "n": i} for i in range(10_000)}
    postings = postings_of(docs)
    calls: list[int] = []

    def metadata_of(label: int) -> dict[str, Any]:
        calls.append(label)
        return docs[label]

    flt = compile_filter({"group": 7, "n": {"gte": 5000}})
    assert flt is not None
    labels = set(Selection(flt, postings, docs.keys(), metadata_of).labels)
    assert labels == {i for i in range(5000, 10_000) if i % 100 == 7}
    assert len(calls) == 100  # the equality's 100 candidates, not a scan of 10k values
    assert set(Selection(flt, postings, docs.keys()).labels) == labels


# -- the property test ---------------------------------------------------------------------------

KEYS = ["a", "b", "c"]
VALUES = [None, True, False, 0, 1, 1.0, 2, 2.5, -1, "", "a", "b", "ab", "B", b"x", b""]
NUMBERS = st.sampled_from([0, 1, 1.5, 2, -1, 2.5, -math.inf, math.inf])
STRINGS = st.sampled_from(["", "a", "ab", "b", "B", "zz"])
METADATA = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)


def _tag(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def ref_equal(a: Any, b: Any) -> bool:
    return _tag(a) == _tag(b) and a == b


def ref_condition(metadata: dict[str, Any], key: str, condition: Any) -> bool:
    present = key in metadata
    value = metadata.get(key)
    if not isinstance(condition, dict):
        return present and ref_equal(value, condition)
    for op, arg in condition.items():
        if op == "exists":
            ok = present == arg
        elif not present:
            ok = False
        elif op == "eq":
            ok = ref_equal(value, arg)
        elif op == "ne":
            ok = not ref_equal(value, arg)
        elif op == "in":
            ok = any(ref_equal(value, x) for x in arg)
        elif op == "nin":
            ok = not any(ref_equal(value, x) for x in arg)
        else:
            same_kind = _tag(value) == _tag(arg)
            compare = {
                "gt": lambda x, y: x > y,
                "gte": lambda x, y: x >= y,
                "lt": lambda x, y: x < y,
                "lte": lambda x, y: x <= y,
            }[op]
            ok = same_kind and compare(value, arg)
        if not ok:
            return False
    return True


def ref_match(metadata: dict[str, Any], where: dict[str, Any]) -> bool:
    for key, condition in where.items():
        if key == "and":
            ok = all(ref_match(metadata, w) for w in condition)
        elif key == "or":
            ok = any(ref_match(metadata, w) for w in condition)
        elif key == "not":
            ok = not ref_match(metadata, condition)
        else:
            ok = ref_condition(metadata, key, condition)
        if not ok:
            return False
    return True


@st.composite
def conditions(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(st.sampled_from(VALUES))
    ops: dict[str, Any] = {}
    bounds = draw(st.sampled_from([NUMBERS, STRINGS]))
    for op in draw(
        st.lists(
            st.sampled_from(["eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "exists"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    ):
        if op in ("eq", "ne"):
            ops[op] = draw(st.sampled_from(VALUES))
        elif op in ("in", "nin"):
            ops[op] = draw(st.lists(st.sampled_from(VALUES), max_size=4))
        elif op == "exists":
            ops[op] = draw(st.booleans())
        else:
            ops[op] = draw(bounds)
    return ops


def wheres(depth: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.dictionaries(st.sampled_from(KEYS), conditions(), min_size=1, max_size=2)
    if depth == 0:
        return leaf
    inner = wheres(depth - 1)
    groups = st.one_of(
        st.builds(lambda ws: {"and": ws}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda ws: {"or": ws}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda w: {"not": w}, inner),
        st.builds(lambda w, g: {**w, **g}, leaf, st.builds(lambda w: {"not": w}, inner)),
    )
    return st.one_of(leaf, groups)


@settings(max_examples=600, deadline=None)
@given(
    docs=st.lists(METADATA, max_size=25),
    where=wheres(),
    removed=st.sets(st.integers(0, 24), max_size=8),
    extra=st.lists(METADATA, max_size=8),
    per_doc=st.sampled_from([None, 0, 3, 10**9]),
)
def test_matches_the_reference_model(
    docs: list[dict[str, Any]],
    where: dict[str, Any],
    removed: set[int],
    extra: list[dict[str, Any]],
    per_doc: int | None,
) -> None:
    flt = compile_filter(where)
    assert flt is not None
    postings = Postings()
    live = dict(enumerate(docs))
    for label, metadata in live.items():
        postings.add(label, metadata)

    def check() -> None:
        expected = {label for label, metadata in live.items() if ref_match(metadata, where)}
        assert {label for label, md in live.items() if flt.matches(md)} == expected
        assert set(Selection(flt, postings, live.keys()).labels) == expected
        with_docs = Selection(flt, postings, live.keys(), live.__getitem__, per_doc=per_doc)
        assert {label for label in range(40) if with_docs.allowed(label)} == expected
        assert set(with_docs.labels) == expected

    check()  # builds the sorted values of the keys with ranges ...
    for label in removed:  # ... which must follow removals and additions
        if label in live:
            postings.remove(label, live.pop(label))
    for label, metadata in enumerate(extra, start=30):
        live[label] = metadata
        postings.add(label, metadata)
    check()


def test_ranges_use_sorted_values_kept_up_to_date() -> None:
    docs = {i: {"ts": i * 0.5, "name": f"n{i:05d}"} for i in range(20_000)}
    postings = postings_of(docs)
    flt = compile_filter({"ts": {"gte": 100, "lt": 101.5}})
    assert flt is not None
    assert set(Selection(flt, postings, docs.keys()).labels) == {200, 201, 202}
    assert postings._sorted[("ts", "n")][0][:3] == [0.0, 0.5, 1.0]
    # Writes keep the sorted values up to date: a new value, a removed one, a shared one.
    postings.add(50_000, {"ts": 100.25})
    postings.remove(201, docs[201])
    postings.add(50_001, {"ts": 100})  # 100 == 100.0: the same value as label 200's
    universe = {*docs.keys(), 50_000, 50_001} - {201}
    assert set(Selection(flt, postings, universe).labels) == {200, 50_000, 50_001, 202}
    postings.remove(200, docs[200])
    postings.remove(50_001, {"ts": 100})
    universe -= {200, 50_001}
    assert set(Selection(flt, postings, universe).labels) == {50_000, 202}
    assert 100.0 not in postings._sorted[("ts", "n")][0]
    names = compile_filter({"name": {"gt": "n19997"}})
    assert names is not None
    assert set(Selection(names, postings, universe).labels) == {19_998, 19_999}
    # A key that is gone takes its sorted values with it.
    for label in list(universe):
        postings.remove(label, docs.get(label, {"ts": 100.25}))
    assert postings._sorted == {}
