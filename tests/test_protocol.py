"""The wire protocol as pure functions: no sockets, no model."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent import errors
from edge_agent.errors import (
    EdgeAgentError,
    EmptyText,
    ErrorCode,
    InvalidArgument,
)
from edge_agent.protocol import (
    ERROR_NOTIFICATION,
    BadRequest,
    BadResponse,
    Decoder,
    EmbedArgs,
    EmbedResult,
    HelloArgs,
    Limits,
    MalformedFrame,
    MessageTooLarge,
    NoArgs,
    Notification,
    ProtocolCode,
    ProtocolError,
    Request,
    Response,
    UnknownMethod,
    bind_args,
    decode_vectors,
    encode_embed_result,
    encode_notification,
    encode_request,
    encode_response,
    encode_vectors,
    error_from_wire,
    error_to_wire,
    exception_class,
    named_args,
    parse_message,
)


def decode_all(data: bytes, limits: Limits | None = None) -> list[Any]:
    decoder = Decoder(limits)
    decoder.feed(data)
    return list(decoder)


# -- framing and messages -----------------------------------------------------------------------


def test_request_round_trip() -> None:
    data = encode_request(7, "embed", {"texts": ["a", "b"], "kind": "query"})
    (obj,) = decode_all(data)
    assert obj == [0, 7, "embed", [{"texts": ["a", "b"], "kind": "query"}]]
    assert parse_message(obj) == Request(7, "embed", [{"texts": ["a", "b"], "kind": "query"}])


def test_request_without_arguments_has_empty_params() -> None:
    (obj,) = decode_all(encode_request(1, "health"))
    assert obj == [0, 1, "health", []]


def test_response_and_notification_round_trip() -> None:
    ok, failed, note = decode_all(
        encode_response(3, None, {"status": "ok"})
        + encode_response(4, [100, "INVALID_ARGUMENT", "bad", {}], None)
        + encode_notification(ERROR_NOTIFICATION, {"error": [405, "MALFORMED_FRAME", "x", {}]})
    )
    assert parse_message(ok) == Response(3, None, {"status": "ok"})
    assert parse_message(failed) == Response(4, [100, "INVALID_ARGUMENT", "bad", {}], None)
    assert parse_message(note) == Notification(
        "error", [{"error": [405, "MALFORMED_FRAME", "x", {}]}]
    )


def test_decoder_reassembles_any_split() -> None:
    stream = b"".join(encode_request(i, "embed", {"texts": [f"text {i}" * 20]}) for i in range(5))
    for step in (1, 3, 64, len(stream)):
        decoder = Decoder()
        out = []
        for start in range(0, len(stream), step):
            decoder.feed(stream[start : start + step])
            out.extend(decoder)
        assert [m[1] for m in out] == [0, 1, 2, 3, 4]
        assert decoder.pending_bytes == 0


def test_decoder_counts_a_partial_message_as_pending() -> None:
    data = encode_request(1, "embed", {"texts": ["x" * 100]})
    decoder = Decoder()
    decoder.feed(data[:-10])
    assert list(decoder) == []
    assert decoder.pending_bytes == len(data) - 10
    assert decoder.room() == Limits().max_message_bytes - decoder.pending_bytes


def _request_of_size(size: int) -> bytes:
    for pad in range(size):
        data = msgpack.packb([0, 1, "embed", [{"texts": ["x"], "p": "y" * pad}]])
        if len(data) == size:
            return data
    raise AssertionError(f"no padding gives {size} bytes")


def test_message_at_the_limit_passes_and_one_byte_more_fails() -> None:
    limits = Limits(max_message_bytes=1024)
    exact = _request_of_size(1024)
    assert len(decode_all(exact, limits)) == 1
    # Several messages per read are fine as long as each fits.
    small = encode_request(1, "health")
    assert len(decode_all(small * 100, Limits(max_message_bytes=len(small) * 100))) == 100
    with pytest.raises(MessageTooLarge) as info:
        decode_all(_request_of_size(1025), limits)
    assert info.value.code == ProtocolCode.MESSAGE_TOO_LARGE


def test_feed_iter_takes_a_read_of_any_size_message_by_message() -> None:
    """What a transport does with whatever one read returned: several messages, split ones,
    and a limit that may change between messages (a connection's does when it authenticates)."""
    small = [encode_request(i, "health") for i in range(3)]
    big = _request_of_size(3000)
    stream = b"".join(small) + big + small[0]
    limit = [len(small[0])]  # only small messages at first

    def current() -> int:
        return limit[0]

    decoder = Decoder(Limits(max_message_bytes=4096))
    seen = []
    for message in decoder.feed_iter(stream[:-5], current):
        seen.append(message[1])
        if len(seen) == 3:
            limit[0] = 4096  # "authenticated" after the third: the big one may come now
    assert seen == [0, 1, 2, 1]
    assert [m[1] for m in decoder.feed_iter(stream[-5:], current)] == [0]
    with pytest.raises(MessageTooLarge) as info:  # an incomplete message at the limit
        list(Decoder(Limits(max_message_bytes=4096)).feed_iter(big[:100], lambda: 100))
    assert info.value.data["limit"] == 100
    with pytest.raises(MessageTooLarge):  # the limit is the decoder's own without a function
        list(Decoder(Limits(max_message_bytes=2048)).feed_iter(big))


_SIZED_HEADERS = {
    "str8": (b"\xd9", 1),
    "str16": (b"\xda", 2),
    "str32": (b"\xdb", 4),
    "bin8": (b"\xc4", 1),
    "bin16": (b"\xc5", 2),
    "bin32": (b"\xc6", 4),
}


def _feed_bytewise(decoder: Decoder, data: bytes) -> list[Any]:
    """Feed one byte at a time, draining after each: the slowest possible peer."""
    out: list[Any] = []
    for byte in data:
        out.extend(decoder.feed_iter(bytes([byte])))
    return out


@pytest.mark.parametrize("kind", sorted(_SIZED_HEADERS))
def test_declared_str_or_bin_length_is_refused_at_the_header(kind: str) -> None:
    # msgpack only checks a str/bin length once its bytes have arrived: the decoder reads the
    # header itself and refuses a payload that could never fit, before buffering any of it.
    lead, width = _SIZED_HEADERS[kind]
    limits = Limits(max_message_bytes=200)
    declared = 2 ** (8 * width) - 1 if width > 1 else 255
    header = lead + declared.to_bytes(width, "big")
    decoder = Decoder(limits)
    assert _feed_bytewise(decoder, header[:-1]) == []  # the length is not known yet
    with pytest.raises(MessageTooLarge) as info:
        list(decoder.feed_iter(header[-1:]))
    assert info.value.code == ProtocolCode.MESSAGE_TOO_LARGE
    assert info.value.data == {"limit": 200, "declared": declared}
    assert decoder.pending_bytes == len(header)  # refused with no payload byte buffered
    with pytest.raises(MalformedFrame):  # and never reused
        decoder.feed(b"\x01")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\xc7\xff\x01", id="ext8"),
        pytest.param(b"\xc8\xff\xff\x01", id="ext16"),
        pytest.param(b"\xc9\xff\xff\xff\xff\x01", id="ext32"),
    ],
)
def test_declared_ext_length_is_refused_at_the_header(header: bytes) -> None:
    decoder = Decoder(Limits(max_message_bytes=200))
    with pytest.raises((MessageTooLarge, MalformedFrame)):
        _feed_bytewise(decoder, header)
    assert decoder.pending_bytes <= len(header)


def test_ext_that_would_fit_is_malformed_at_its_header() -> None:
    # Extension types are not part of the protocol: no need to wait for the payload either.
    decoder = Decoder(Limits(max_message_bytes=200))
    with pytest.raises(MalformedFrame):
        _feed_bytewise(decoder, b"\x92\x01\xc7\x10")


@pytest.mark.parametrize("kind", sorted(_SIZED_HEADERS))
def test_a_declared_length_that_just_fits_is_waited_for(kind: str) -> None:
    # The check counts the header's position: a payload ending exactly at the limit is fine,
    # one byte more is refused at the header.
    lead, width = _SIZED_HEADERS[kind]
    prefix = b"\x94\x00\x01\xa5embed\x91\x81\xa5texts\x91"
    is_str = lead in (b"\xd9", b"\xda", b"\xdb")
    for extra in (0, 1):
        limit = 300 if width > 1 else 255 + len(prefix) + 2
        length = limit - len(prefix) - 1 - width + extra
        if width == 1 and length > 255:
            continue  # str8/bin8 cannot declare more than 255
        header = prefix + lead + length.to_bytes(width, "big")
        decoder = Decoder(Limits(max_message_bytes=limit))
        if extra:
            with pytest.raises(MessageTooLarge):
                _feed_bytewise(decoder, header)
            continue
        assert _feed_bytewise(decoder, header) == []
        payload = (b"x" if is_str else b"\x00") * length
        (message,) = list(decoder.feed_iter(payload))
        assert len(header) + len(payload) == limit
        assert message[3][0]["texts"][0] == (payload.decode() if is_str else payload)


def test_headers_are_checked_against_the_limit_of_the_moment() -> None:
    """What a TCP connection does: 4 KiB before auth, the full limit after."""
    limit = [4096]
    str32_1mib = b"\xdb" + (1 << 20).to_bytes(4, "big")
    hello = encode_request(1, "hello", {"client": "c"})
    decoder = Decoder(Limits(max_message_bytes=2 << 20))
    # Before "auth": a 1 MiB string is refused as soon as its header is here.
    with pytest.raises(MessageTooLarge) as info:
        list(decoder.feed_iter(hello + b"\x94\x00\x02\xa5hello\x91\x81\xa1x" + str32_1mib,
                               lambda: limit[0]))  # fmt: skip
    assert info.value.data["limit"] == 4096
    # After it: the same header is fine, and the message decodes when its bytes arrive.
    decoder = Decoder(Limits(max_message_bytes=2 << 20))
    seen = list(decoder.feed_iter(hello, lambda: limit[0]))
    limit[0] = 2 << 20
    head = b"\x94\x00\x02\xa5hello\x91\x81\xa1x" + str32_1mib
    assert list(decoder.feed_iter(head, lambda: limit[0])) == []
    body = b"y" * (1 << 20)
    for start in range(0, len(body), 65536):
        seen += decoder.feed_iter(body[start : start + 65536], lambda: limit[0])
    assert [m[1] for m in seen] == [1, 2] and len(seen[1][3][0]["x"]) == 1 << 20


_WIRE_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=70_000).filter(lambda b: len(b) < 300 or len(b) > 65_000)
    | st.sampled_from(["", "x" * 31, "y" * 32, "z" * 255, "w" * 256, "v" * 65_536]),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(_WIRE_VALUES, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=40),
)
def test_header_check_never_refuses_a_valid_stream(values: list[Any], cuts: list[int]) -> None:
    # The check walks the tokens of incomplete messages itself: however a valid stream is cut,
    # it must stay aligned with msgpack and decode exactly what msgpack does.
    stream = b"".join(msgpack.packb(v, use_bin_type=True) for v in values)
    largest = max(len(msgpack.packb(v, use_bin_type=True)) for v in values)
    decoder = Decoder(Limits(max_message_bytes=max(64, largest)))
    out: list[Any] = []
    offset, index = 0, 0
    while offset < len(stream):
        step = cuts[index % len(cuts)]
        index += 1
        out.extend(decoder.feed_iter(stream[offset : offset + step]))
        offset += step
    assert out == values
    assert decoder.pending_bytes == 0


def test_one_endless_message_is_too_large_even_if_streamed() -> None:
    # msgpack consumes arrays element by element: the limit must count the message, not the
    # unpacker's buffer.
    limits = Limits(max_message_bytes=4096)
    decoder = Decoder(limits)
    decoder.feed(b"\xdc\xff\xff")  # array16 of 65535 elements, then elements forever
    with pytest.raises(MessageTooLarge):
        for _ in range(10_000):
            decoder.feed(b"\x01" * min(64, decoder.room()) or b"\x01")
            assert list(decoder) == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-4G"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-4G"),
        pytest.param(b"\xc9\x00\x00\x00\x01\x05x", id="ext"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\xa3\xff\xfe\xfd", id="invalid-utf8"),
        pytest.param(b"\x81\x01\x02", id="int-map-key"),
        pytest.param(b"\x91" * 5000, id="too-deep"),
    ],
)
def test_hostile_frames_raise_malformed_frame(data: bytes) -> None:
    decoder = Decoder()
    with pytest.raises(MalformedFrame) as info:
        decoder.feed(data)
        list(decoder)
    assert info.value.code == ProtocolCode.MALFORMED_FRAME
    # Never reused after an error: the stream cannot be resynchronised.
    with pytest.raises(MalformedFrame):
        decoder.feed(encode_request(1, "health"))


@pytest.mark.parametrize(
    ("obj", "msgid"),
    [
        (5, None),
        ([], None),
        (["0", 1, "m", []], None),
        ([0, -1, "m", []], None),
        ([0, 2**32, "m", []], None),
        ([0, 1, "m"], None),
        ([3, 1, "m", []], None),
        ([0, 9, 5, []], 9),
        ([0, 9, "m", {}], 9),
        ([2, "m"], None),
        ([True, 1, "m", []], None),
    ],
)
def test_bad_message_shapes(obj: Any, msgid: int | None) -> None:
    with pytest.raises(BadRequest) as info:
        parse_message(obj)
    assert info.value.data.get("msgid") == msgid


# -- params convention --------------------------------------------------------------------------


@pytest.mark.parametrize("params", [[], [{}], [None]])
def test_no_arguments(params: list[Any]) -> None:
    assert named_args(params) == {}
    assert bind_args("health", params) == NoArgs()


@pytest.mark.parametrize("params", [{}, [1], [[]], [{}, {}], "x", None])
def test_params_must_be_one_map(params: Any) -> None:
    with pytest.raises(BadRequest):
        named_args(params)


def test_unknown_method() -> None:
    with pytest.raises(UnknownMethod) as info:
        bind_args("nope", [])
    assert info.value.code == ProtocolCode.UNKNOWN_METHOD


def test_embed_arguments_and_defaults() -> None:
    args = bind_args("embed", [{"texts": ["a"]}])
    assert args == EmbedArgs(["a"], "document", None, None, "truncate")
    full = {"texts": ["a"], "kind": "query", "instruction": "find", "dimensions": 64,
            "long_text": "chunk"}
    args = bind_args("embed", [full])
    assert args == EmbedArgs(["a"], "query", "find", 64, "chunk")
    assert args.to_args() == full
    assert bind_args("hello", [{"client": "x/1", "protocol": 1}]) == HelloArgs("x/1", 1)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({}, InvalidArgument),
        ({"texts": "abc"}, InvalidArgument),
        ({"texts": []}, InvalidArgument),
        ({"texts": ["ok", 3]}, InvalidArgument),
        ({"texts": ["ok", "  "]}, EmptyText),
        ({"texts": ["ok"], "kind": "passage"}, InvalidArgument),
        ({"texts": ["ok"], "long_text": "wrap"}, InvalidArgument),
        ({"texts": ["ok"], "instruction": ""}, InvalidArgument),
        ({"texts": ["ok"], "dimensions": "64"}, InvalidArgument),
        ({"texts": ["ok"], "dimensions": 1.5}, InvalidArgument),
        ({"texts": ["ok"], "dimensions": True}, InvalidArgument),
        ({"texts": ["ok"], "dimension": 64}, InvalidArgument),
    ],
)
def test_embed_argument_errors(args: dict[str, Any], error: type[EdgeAgentError]) -> None:
    with pytest.raises(error) as info:
        bind_args("embed", [args])
    assert type(info.value) is error


def test_empty_text_reports_its_index() -> None:
    with pytest.raises(EmptyText) as info:
        bind_args("embed", [{"texts": ["a", "b", "\n"]}])
    assert info.value.data == {"index": 2}


def test_unknown_argument_of_argumentless_method() -> None:
    with pytest.raises(InvalidArgument):
        bind_args("stats", [{"verbose": True}])


# -- errors -------------------------------------------------------------------------------------


ALL_CODES = [*ErrorCode, *ProtocolCode]


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_every_code_maps_to_a_class_with_that_code(code: int) -> None:
    cls = exception_class(code)
    assert int(cls.code) == int(code)
    assert issubclass(cls, EdgeAgentError)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_errors_survive_the_wire(code: int) -> None:
    cls = exception_class(code)
    sent = cls("something went wrong", index=3, allowed=[64, 128])
    wire = error_to_wire(sent)
    assert wire == [int(code), cls.code.name, "something went wrong", {"index": 3,
                    "allowed": [64, 128]}]
    (decoded,) = decode_all(msgpack.packb(wire, use_bin_type=True))
    received = error_from_wire(decoded)
    assert type(received) is cls
    assert received.message == sent.message
    assert received.data == sent.data


def test_one_code_space_with_one_class_per_code() -> None:
    # ProtocolCode is the same enum: the protocol's codes are the 4xx of ErrorCode.
    assert ProtocolCode is ErrorCode
    assert all(400 <= int(c) < 500 for c in ErrorCode if c.name in _PROTOCOL_NAMES)
    classes = [
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), Exception)
    ]
    codes = [cls.code for cls in classes if cls is not errors.ProtocolError]
    assert len(codes) == len(set(codes)), "two classes share a code"
    # Every code has its class, so a caller can catch whatever arrives over the wire.
    for code in ErrorCode:
        assert exception_class(code).code == code or code == ErrorCode.INTERNAL


_PROTOCOL_NAMES = {
    "BAD_REQUEST", "UNKNOWN_METHOD", "MESSAGE_TOO_LARGE", "OVERLOADED", "SHUTTING_DOWN",
    "MALFORMED_FRAME", "AUTH_REQUIRED", "AUTH_FAILED", "CONNECTION_FAILED", "TIMEOUT",
    "BAD_RESPONSE", "ALREADY_RUNNING",
}


def test_every_error_is_exported_from_the_package() -> None:
    import edge_agent

    for name in errors.__all__:
        if name == "error_for_code":
            continue
        assert name in edge_agent.__all__, name
        assert getattr(edge_agent, name) is getattr(errors, name)
    for name in ("ConnectionFailed", "Overloaded", "CollectionNotFound", "RequestTimeout"):
        assert issubclass(getattr(edge_agent, name), edge_agent.EdgeAgentError)


def test_errors_py_classes_are_reused() -> None:
    assert exception_class(ErrorCode.EMPTY_TEXT) is errors.EmptyText
    assert exception_class(ErrorCode.INTERNAL) is errors.EdgeAgentError


def test_unknown_code_keeps_its_name() -> None:
    received = error_from_wire([777, "FUTURE_THING", "from a newer server", {}])
    assert type(received) is EdgeAgentError
    assert "FUTURE_THING" in received.message
    assert received.data["remote_code"] == 777


@pytest.mark.parametrize(
    "error", [None, 5, [], [100, "X", "m"], ["100", "X", "m", {}], [100, "X", "m", [1]]]
)
def test_malformed_error_is_bad_response(error: Any) -> None:
    assert isinstance(error_from_wire(error), BadResponse)


def test_unserialisable_error_data_is_made_safe() -> None:
    wire = error_to_wire(InvalidArgument("x", thing=object(), nested={"a": (1, 2)}))
    msgpack.packb(wire)  # must not raise
    assert wire[3]["nested"] == {"a": [1, 2]}


def test_client_side_errors_are_standard_exceptions_too() -> None:
    assert issubclass(exception_class(ProtocolCode.TIMEOUT), TimeoutError)
    assert issubclass(exception_class(ProtocolCode.CONNECTION_FAILED), ConnectionError)


# -- vectors ------------------------------------------------------------------------------------


def test_vectors_are_little_endian_float32() -> None:
    vectors = np.array([[1.0, -2.5], [0.25, 3.0], [0.0, 1e-8]], dtype=np.float64)
    wire = encode_vectors(vectors)
    assert wire["dims"] == 2 and wire["count"] == 3
    assert wire["vectors"] == struct.pack("<6f", 1.0, -2.5, 0.25, 3.0, 0.0, 1e-8)
    back = decode_vectors(wire["vectors"], 2, 3)
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back, vectors.astype(np.float32))


@pytest.mark.parametrize(
    ("data", "dims", "count"), [(b"\0" * 12, 2, 2), ("x", 1, 1), (b"\0" * 4, 1.0, 1)]
)
def test_vector_size_mismatch_is_bad_response(data: Any, dims: Any, count: Any) -> None:
    with pytest.raises(BadResponse):
        decode_vectors(data, dims, count)


def test_embed_result_round_trip() -> None:
    vectors = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    wire = encode_embed_result(vectors, [3, 4], [False, True], [1, 1], "m", "F32")
    (decoded,) = decode_all(msgpack.packb(wire, use_bin_type=True))
    result = EmbedResult.from_wire(decoded)
    np.testing.assert_array_equal(result.vectors, vectors)
    assert (result.dims, result.count) == (5, 2)
    assert result.token_counts == [3, 4] and result.truncated == [False, True]
    assert result.chunks == [1, 1] and (result.model, result.quant) == ("m", "F32")


def test_embed_result_with_missing_field_is_bad_response() -> None:
    wire = encode_embed_result(np.zeros((1, 2)), [1], [False], [1], "m", "F32")
    del wire["chunks"]
    with pytest.raises(BadResponse):
        EmbedResult.from_wire(wire)


def test_limits_are_validated() -> None:
    with pytest.raises(InvalidArgument):
        Limits(max_message_bytes=0)


# -- fuzz ---------------------------------------------------------------------------------------


def _decode_untrusted(data: bytes, chunk: int) -> None:
    decoder = Decoder(Limits(max_message_bytes=4096, max_array_len=64, max_map_len=64))
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        if len(piece) > decoder.room():
            piece = piece[: max(decoder.room(), 1)]
        decoder.feed(piece)
        for obj in decoder:
            message = parse_message(obj)
            if isinstance(message, Request):
                try:
                    bind_args(message.method, message.params)
                except InvalidArgument:
                    pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512), chunk=st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes_raise_only_typed_errors(data: bytes, chunk: int) -> None:
    try:
        _decode_untrusted(data, chunk)
    except ProtocolError:
        pass


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    head=st.sampled_from([b"\x94\x00\x01\xa5embed", b"\x94\x00", b"\x93\x02", b""]),
    value=_values,
    cut=st.integers(min_value=0, max_value=64),
)
def test_fuzz_mutated_requests_raise_only_typed_errors(head: bytes, value: Any, cut: int) -> None:
    # Almost-valid requests reach parse_message and argument binding, where random bytes rarely go.
    body = head + msgpack.packb(value, use_bin_type=True)
    for data in (body, body[: len(body) - cut]):
        try:
            _decode_untrusted(data, 7)
        except ProtocolError:
            pass
