"""Property tests of every wire encoder/decoder pair, plus upstream-format fixtures."""

from __future__ import annotations

import base64
import string

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import protocol as p
from core.domain import TaskLimits

text = st.text(alphabet=string.ascii_letters + string.digits + "-_./: é", max_size=24)
ids = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=36)
json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(text, inner, max_size=4), max_leaves=12)
json_obj = st.dictionaries(text, json_value, max_size=4)
digests = st.binary(min_size=1, max_size=8).map(p.sha256_digest)
limits = st.builds(
    TaskLimits,
    timeout_s=st.none() | st.floats(min_value=0.001, max_value=1e6, allow_nan=False),
    fuel=st.none() | st.integers(1, 2**62),
    memory_bytes=st.none() | st.integers(1, 2**40),
)

starts = st.builds(
    p.StartMessage,
    id=ids, name=ids, state=st.integers(0, 6), image_url=text,
    file=st.binary(min_size=1, max_size=64), inputs=st.lists(text, max_size=4).map(tuple),
    cli_args=st.lists(text, max_size=3).map(tuple), broadcast=st.booleans(), daemon=st.booleans(),
    latent=st.booleans(), encrypted=st.just(False), env=st.dictionaries(text, text, max_size=3),
    kbs_resource_path=text, monitoring_profile=st.none() | json_obj, proplet_id=text,
    hal_storage_path=text, parent_results=st.none() | json_obj, mode=st.sampled_from(["", "infer", "train"]),
    wasm_digest=st.just("") | digests, wasm_signature=text, limits=limits, attempt=st.integers(0, 1000),
    traceparent=text, result_acks=st.lists(st.tuples(ids, st.integers(0, 100)), max_size=3).map(tuple),
)
stops = st.builds(p.StopMessage, id=ids, proplet_id=text, broadcast=st.booleans(), traceparent=text).map(
    lambda m: m if not m.broadcast else p.StopMessage(m.id, "", True, m.traceparent))
invokes = st.builds(p.InvokeMessage, id=ids, invocation_id=text, proplet_id=text, broadcast=st.booleans(),
                    inputs=st.lists(text, max_size=3).map(tuple), env=st.dictionaries(text, text, max_size=2),
                    traceparent=text)
discoveries = st.builds(p.DiscoveryMessage, proplet_id=ids, namespace=text, metadata=json_obj, traceparent=text)
alives = st.builds(p.AliveMessage, proplet_id=ids, status=st.sampled_from(["alive", "offline"]), namespace=text,
                   running=st.lists(ids, max_size=3).map(tuple), traceparent=text)
results = st.builds(p.ResultMessage, task_id=ids, proplet_id=ids, results=json_value, error=text,
                    attempt=st.integers(0, 100), traceparent=text, started_at=text)
invoke_results = st.builds(p.InvokeResultMessage, task_id=ids, invocation_id=ids, proplet_id=text,
                           results=text, error=text, traceparent=text)
proplet_metrics = st.builds(p.PropletMetricsMessage, proplet_id=ids, namespace=text, timestamp=json_scalar,
                            cpu_metrics=json_obj, memory_metrics=json_obj, traceparent=text)
task_metrics = st.builds(p.TaskMetricsMessage, task_id=ids, proplet_id=text, metrics=json_obj,
                         aggregated=st.none() | json_obj, timestamp=json_scalar, traceparent=text)
task_states = st.builds(p.TaskStateMessage, task_id=ids, proplet_id=ids,
                        state=st.sampled_from(p.TASK_STATES), attempt=st.integers(0, 100),
                        reason=text, traceparent=text)
result_acks = st.builds(p.ResultAckMessage, task_id=ids, proplet_id=ids, attempt=st.integers(0, 100),
                        more=st.lists(st.tuples(ids, st.integers(0, 100)), max_size=4).map(tuple))
registry_requests = st.builds(p.RegistryRequest, app_name=ids,
                              missing=st.lists(st.integers(0, 1000), max_size=5).map(tuple),
                              proplet_id=text, traceparent=text, encoding=st.sampled_from(["", "binary"]) | text)


@st.composite
def chunks(draw: st.DrawFn) -> p.ChunkMessage:
    total = draw(st.integers(1, 50))
    return p.ChunkMessage(draw(ids), draw(st.integers(0, total - 1)), total, draw(st.binary(max_size=64)),
                          draw(st.just("") | digests), draw(st.integers(0, 2**40)), draw(text))


PAIRS = [
    (starts, p.encode_start, p.decode_start),
    (stops, p.encode_stop, p.decode_stop),
    (invokes, p.encode_invoke, p.decode_invoke),
    (discoveries, p.encode_discovery, p.decode_discovery),
    (alives, p.encode_alive, p.decode_alive),
    (results, p.encode_result, p.decode_result),
    (invoke_results, p.encode_invoke_result, p.decode_invoke_result),
    (proplet_metrics, p.encode_proplet_metrics, p.decode_proplet_metrics),
    (task_metrics, p.encode_task_metrics, p.decode_task_metrics),
    (task_states, p.encode_task_state, p.decode_task_state),
    (result_acks, p.encode_result_ack, p.decode_result_ack),
    (registry_requests, p.encode_registry_request, p.decode_registry_request),
    (chunks(), p.encode_chunk, p.decode_chunk),
    (chunks(), p.encode_binary_chunk, p.decode_binary_chunk),
]
DECODERS = [decode for _, _, decode in PAIRS]


@pytest.mark.parametrize(("strategy", "encode", "decode"), PAIRS, ids=[d.__name__ for d in DECODERS])
def test_decode_inverts_encode(strategy, encode, decode) -> None:
    @settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(strategy)
    def roundtrip(message) -> None:
        assert decode(encode(message)) == message

    roundtrip()


@pytest.mark.parametrize("decode", DECODERS, ids=[d.__name__ for d in DECODERS])
def test_arbitrary_bytes_raise_only_invalid_message(decode) -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=256) | json_value.map(orjson.dumps) | json_obj.map(orjson.dumps))
    def fuzz(payload: bytes) -> None:
        try:
            decode(payload)
        except p.InvalidMessage:
            pass

    fuzz()


@pytest.mark.parametrize("decode", DECODERS, ids=[d.__name__ for d in DECODERS])
def test_valid_messages_with_one_field_mangled_raise_only_invalid_message(decode) -> None:
    """Take a valid message, replace one field with a value of another type."""
    pair = next(pr for pr in PAIRS if pr[2] is decode)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pair[0], st.data())
    def mangle(message, data) -> None:
        raw = pair[1](message)
        # A binary chunk's fields are its header line; the bytes after it are not JSON.
        head, newline, rest = raw.partition(b"\n") if decode is p.decode_binary_chunk else (raw, b"", b"")
        obj = orjson.loads(head)
        key = data.draw(st.sampled_from(sorted(obj)))
        obj[key] = data.draw(json_value)
        try:
            decode(orjson.dumps(obj) + newline + rest)
        except p.InvalidMessage:
            pass

    mangle()


def test_upstream_manager_start_decodes() -> None:
    """A start exactly as upstream's Go manager publishes it (numbers as text, cli_args null)."""
    wasm = base64.b64encode(b"\0asm\x01\0\0\0").decode()
    raw = (
        '{"id":"5d5b6c1e-6a2e-4f61-9a5b-2b9c8f0f1a11","name":"add","state":2,"file":"' + wasm + '",'
        '"inputs":["1","2"],"cli_args":null,"broadcast":false,"daemon":false,"latent":false,'
        '"encrypted":false,"proplet_id":"p1","parent_results":{"x":"7"}}'
    )
    msg = p.decode_start(raw)
    assert msg.inputs == ("1", "2") and msg.cli_args == () and msg.file.startswith(b"\0asm")
    assert msg.targets("p1") and not msg.targets("p2")


def test_missing_required_fields_are_named() -> None:
    with pytest.raises(p.InvalidMessage, match="'task_id'"):
        p.decode_result(b'{"results":"1"}')
    with pytest.raises(p.InvalidMessage, match="'proplet_id'"):
        p.decode_alive(b'{"status":"alive"}')
    with pytest.raises(p.InvalidMessage, match="one of 'file' or 'image_url'"):
        p.decode_start(b'{"id":"a","name":"b"}')
    with pytest.raises(p.InvalidMessage, match="not valid JSON"):
        p.decode_discovery(b"{oops")


def test_unknown_fields_are_ignored() -> None:
    msg = p.decode_alive(b'{"proplet_id":"x","status":"alive","future_field":[1,2]}')
    assert msg == p.AliveMessage("x", "alive")


def test_fl_result_envelope_gives_the_proplet_id() -> None:
    raw = b'{"task_id":"t","results":{"task_id":"t","round_id":"r","proplet_id":"p9","num_samples":1},"error":null}'
    assert p.decode_result(raw).proplet_id == "p9"


@pytest.mark.parametrize(("value", "expected"), [
    ("2026-11-23T10:00:00.123456789Z", "2026-11-23T10:00:00.123456+00:00"),
    ("2026-11-23T10:00:00+02:00", "2026-11-23T10:00:00+02:00"),
    ({"secs_since_epoch": 0, "nanos_since_epoch": 500_000_000}, "1970-01-01T00:00:00.500000+00:00"),
    (12345, None),
    ("not a time", None),
])
def test_timestamps_of_both_upstream_proplets(value, expected) -> None:
    parsed = p.parse_timestamp(value)
    assert (parsed.isoformat() if parsed else None) == expected


def test_a_proplet_skips_starts_for_other_proplets_without_validating_them() -> None:
    # Every proplet receives every start (upstream's single topic); only its own are decoded.
    ours = {"id": "t1", "name": "add", "file": base64.b64encode(b"\0asm").decode(), "proplet_id": "p-1"}
    assert p.decode_start_for("p-1", orjson.dumps(ours)).id == "t1"
    assert p.decode_start_for("p-2", orjson.dumps(ours)) is None
    # Someone else's broken start is not ours to reject; ours is.
    broken = {"id": "t2", "name": 5, "proplet_id": "p-1"}
    assert p.decode_start_for("p-2", orjson.dumps(broken)) is None
    with pytest.raises(p.InvalidMessage, match="name"):
        p.decode_start_for("p-1", orjson.dumps(broken))
    # Unpinned and broadcast starts are for everyone.
    for extra in ({}, {"proplet_id": "p-9", "broadcast": True}):
        msg = p.decode_start_for("p-2", orjson.dumps({**ours, **extra} if extra else
                                                     {k: v for k, v in ours.items() if k != "proplet_id"}))
        assert msg is not None and msg.targets("p-2")


CHUNK_FIELDS = '"app_name":"a","chunk_idx":0,"total_chunks":1'


@pytest.mark.parametrize("payload", [
    '{' + CHUNK_FIELDS + ',"data":"QUJD"}',  # the cut: data read without parsing it
    '{"data":"QUJD",' + CHUNK_FIELDS + '}',
    '{' + CHUNK_FIELDS + ',"data":"QUJD","x":{"data":"WFla"}}',  # a nested "data" after it
    '{"x":{"data":"WFla"},' + CHUNK_FIELDS + ',"data":"QUJD"}',  # ... or before it
    '{"x":{"data":"WFla"},' + CHUNK_FIELDS + '}',  # only a nested one: no module bytes
    '{"data":"WFla",' + CHUNK_FIELDS + ',"data":"QUJD"}',  # duplicate keys: JSON's last one wins
    '{' + CHUNK_FIELDS + ',"data":"QU\\/D"}',  # an escaped solidus
    '{' + CHUNK_FIELDS + ', "data": "QUJD"}',  # spaces
    '{' + CHUNK_FIELDS + ',"data":"QUJ"}',  # not base64
    '{' + CHUNK_FIELDS + ',"data":"QUJD}',  # unterminated
    '{' + CHUNK_FIELDS.replace('"a"', '"x\\"data\\":\\"y"') + ',"data":"QUJD"}',  # "data" inside a string
])
def test_a_chunk_reads_the_same_with_and_without_cutting_its_data_out(payload: str) -> None:
    def read(raw: bytes | str) -> object:
        try:
            return p.decode_chunk(raw)
        except p.InvalidMessage as exc:
            return ("invalid", str(exc))

    expected = read(payload)  # text is always parsed whole
    assert read(payload.encode()) == expected


def test_our_chunks_and_gos_are_read_without_parsing_their_data() -> None:
    ours = p.encode_chunk(p.ChunkMessage("reg/app:1", 3, 9, b"\0asm" * 1000, "sha256:" + "a" * 64, 4000))
    go = ('{"app_name":"reg/app:1","chunk_idx":3,"total_chunks":9,"data":"' + base64.b64encode(b"\0asm").decode()
          + '"}').encode()
    for payload in (ours, go):
        cut = p._cut_data(payload)
        assert cut is not None and orjson.loads(cut[0])["data"] == "" and len(cut[0]) < 200
    assert p.decode_chunk(ours).data == b"\0asm" * 1000 and p.decode_chunk(go).data == b"\0asm"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["data", "app_name", "x", "chunk_idx", "total_chunks"]),
                          st.one_of(st.sampled_from(["QUJD", "WFla", "", "QU==", "a"]),
                                    st.dictionaries(st.just("data"), st.just("WFla")), st.integers(0, 2))),
                min_size=1, max_size=6))
def test_any_arrangement_of_data_fields_reads_as_a_full_parse_does(fields: list[tuple[str, object]]) -> None:
    payload = "{" + ",".join(f"{orjson.dumps(k).decode()}:{orjson.dumps(v).decode()}" for k, v in fields) + "}"

    def read(raw: bytes | str) -> object:
        try:
            return p.decode_chunk(raw)
        except p.InvalidMessage as exc:
            return ("invalid", str(exc))

    assert read(payload.encode()) == read(payload)


@settings(max_examples=200, deadline=None)
@given(chunks())
def test_a_chunk_is_encoded_as_the_whole_object_dumped_as_json(msg: p.ChunkMessage) -> None:
    # The encoder splices the base64 in; the bytes must be those of the plain JSON encoding.
    obj: dict[str, object] = {"app_name": msg.app_name, "chunk_idx": msg.chunk_idx,
                              "total_chunks": msg.total_chunks, "data": base64.b64encode(msg.data).decode()}
    obj.update({k: v for k, v in (("digest", msg.digest), ("size", msg.size), ("error", msg.error)) if v})
    assert p.encode_chunk(msg) == orjson.dumps(obj)


def test_a_binary_chunk_is_its_header_line_then_the_bytes_as_they_are() -> None:
    data = b"\n\0asm\n" * 100
    chunk = p.ChunkMessage("reg/app:v1", 1, 2, data, p.sha256_digest(b"x"), 1234)
    payload = p.encode_binary_chunk(chunk)
    head, _, rest = payload.partition(b"\n")
    assert orjson.loads(head) == {"app_name": "reg/app:v1", "chunk_idx": 1, "total_chunks": 2,
                                  "digest": p.sha256_digest(b"x"), "size": 1234}
    assert rest == data
    assert len(payload) < len(p.encode_chunk(chunk)) - len(data) // 4
    # Chunks of refs nobody waits for are recognised from the header line alone.
    assert p.decode_binary_chunk_for({"other/app:v1"}, payload) is None
    assert p.decode_binary_chunk_for({"reg/app:v1"}, payload) == chunk
    with pytest.raises(p.InvalidMessage, match="header line"):
        p.decode_binary_chunk(b"{}" + data.replace(b"\n", b""))
