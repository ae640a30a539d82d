"""The C proplet against the Python wire contract, case by generated case.

The C encoders must produce the same bytes as core/protocol.py, the C decoders must read what
the manager sends as core/protocol.py reads it, and task inputs and results must follow
core/wasmvalues.py exactly. build/host/wirecheck runs the C side.
"""

from __future__ import annotations

import base64
import math
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import protocol as p
from core.domain import TaskLimits
from core.wasmvalues import WasmValueError, format_value, parse_input
from tests.firmware.conftest import WIRECHECK_BINARY

# C strings end at NUL, so ids and texts that reach the device never contain one.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
short_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=64)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=64)
# Digits, signs, words, quotes, and the whitespace and invisible characters Python strips or
# escapes in error messages (NBSP, NEL, em space, ideographic space, soft hyphen, ZWSP).
number_text = st.text(alphabet="0123456789+-.eEinfatyINFATY \t\x1c'\"\\\xa0\x85\u2003\u3000\xad\u200b\u00e9",
                      max_size=24)
limits = st.builds(
    TaskLimits,
    timeout_s=st.none() | st.floats(min_value=0.001, max_value=1e6, allow_nan=False),
    fuel=st.none() | st.integers(1, 2**53),
    memory_bytes=st.none() | st.integers(1, 2**40),
)
digests = st.binary(min_size=1, max_size=8).map(p.sha256_digest)
signatures = st.binary(min_size=64, max_size=64).map(lambda raw: base64.b64encode(raw).decode())
CHECKS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Wirecheck:
    """One wirecheck process answering a JSON request per line."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     encoding="utf-8", bufsize=1)

    def ask(self, request: dict[str, Any]) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(request).decode() + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"wirecheck exited ({self.proc.poll()})"
        return answer.rstrip("\n")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def c_side(host_build: Path) -> Iterator[Wirecheck]:
    checker = Wirecheck(WIRECHECK_BINARY)
    yield checker
    checker.close()
    assert checker.proc.returncode == 0, "wirecheck failed (sanitizer report above)"


def value_bits(kind: str, value: float | int) -> str:
    if kind == "i32":
        return f"{value & 0xFFFFFFFF:08x}"
    if kind == "i64":
        return f"{value & 0xFFFFFFFFFFFFFFFF:016x}"
    if kind == "f32":
        return struct.pack(">f", value).hex()
    return struct.pack(">d", value).hex()


@CHECKS
@given(bits=st.integers(0, 2**32 - 1))
def test_f32_results_format_like_python(c_side: Wirecheck, bits: int) -> None:
    value = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    assert c_side.ask({"op": "format", "type": "f32", "bits": f"{bits:08x}"}) == format_value(value, "f32")


@CHECKS
@given(value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60).map(float))
def test_f64_results_format_like_python(c_side: Wirecheck, value: float) -> None:
    bits = struct.pack(">d", value).hex()
    assert c_side.ask({"op": "format", "type": "f64", "bits": bits}) == format_value(value, "f64")


@CHECKS
@given(kind=st.sampled_from(["i32", "i64"]), value=st.integers(-(2**63), 2**63 - 1))
def test_integer_results_format_like_python(c_side: Wirecheck, kind: str, value: int) -> None:
    if kind == "i32":
        value = (value + 2**31) % 2**32 - 2**31
    assert c_side.ask({"op": "format", "type": kind, "bits": value_bits(kind, value)}) == format_value(value, kind)


def python_parse(text_: str, kind: str, index: int) -> dict[str, Any]:
    try:
        value = parse_input(text_, kind, index)
    except WasmValueError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": True, "value": value}


@CHECKS
@given(kind=st.sampled_from(["i32", "i64", "f32", "f64", "v128"]), index=st.integers(0, 15),
       text_=number_text | st.integers(-(2**65), 2**65).map(str)
       | st.floats(allow_nan=False, width=32).map(repr) | st.floats(allow_nan=False).map(repr))
def test_inputs_convert_like_python(c_side: Wirecheck, kind: str, index: int, text_: str) -> None:
    expected = python_parse(text_, kind, index)
    got = orjson.loads(c_side.ask({"op": "parse", "type": kind, "text": text_, "index": index}))
    assert got["ok"] == expected["ok"], (got, expected)
    if not expected["ok"]:
        assert got["error"] == expected["error"]
        return
    value = expected["value"]
    if isinstance(value, float) and math.isnan(value):
        raw = bytes.fromhex(got["bits"])
        assert math.isnan(struct.unpack(">f" if kind == "f32" else ">d", raw)[0])
    else:
        assert got["bits"] == value_bits(kind, value)


@CHECKS
@given(task_id=ids, proplet_id=ids, results=text, error=text, attempt=st.integers(0, 2**31), trace=short_text)
def test_results_encode_like_python(c_side: Wirecheck, task_id: str, proplet_id: str, results: str, error: str,
                                    attempt: int, trace: str) -> None:
    expected = p.encode_result(p.ResultMessage(task_id, proplet_id, results, error, attempt, trace))
    got = c_side.ask({"op": "result", "task_id": task_id, "proplet_id": proplet_id, "results": results,
                      "error": error, "attempt": attempt, "traceparent": trace})
    assert got.encode() == expected


@CHECKS
@given(task_id=ids, proplet_id=ids, state=st.sampled_from(["running", "rejected"]), attempt=st.integers(0, 1000),
       reason=text, trace=short_text)
def test_task_states_encode_like_python(c_side: Wirecheck, task_id: str, proplet_id: str, state: str,
                                        attempt: int, reason: str, trace: str) -> None:
    expected = p.encode_task_state(p.TaskStateMessage(task_id, proplet_id, state, attempt, reason, trace))
    got = c_side.ask({"op": "task_state", "task_id": task_id, "proplet_id": proplet_id, "state": state,
                      "attempt": attempt, "reason": reason, "traceparent": trace})
    assert got.encode() == expected


@CHECKS
@given(proplet_id=ids, status=st.sampled_from(["alive", "offline"]), namespace=short_text,
       running=st.lists(ids, max_size=8))
def test_heartbeats_encode_like_python(c_side: Wirecheck, proplet_id: str, status: str, namespace: str,
                                       running: list[str]) -> None:
    expected = p.encode_alive(p.AliveMessage(proplet_id, status, namespace, tuple(running)))
    got = c_side.ask({"op": "alive", "proplet_id": proplet_id, "status": status, "namespace": namespace,
                      "running": running})
    assert got.encode() == expected


@CHECKS
@given(app_name=text.filter(bool), missing=st.lists(st.integers(0, 511), max_size=64), proplet_id=short_text,
       encoding=st.sampled_from(["", p.CHUNK_ENCODING_BINARY]))
def test_registry_requests_encode_like_python(c_side: Wirecheck, app_name: str, missing: list[int],
                                              proplet_id: str, encoding: str) -> None:
    expected = p.encode_registry_request(p.RegistryRequest(app_name, tuple(missing), proplet_id, encoding=encoding))
    got = c_side.ask({"op": "registry_request", "app_name": app_name, "missing": missing,
                      "proplet_id": proplet_id, "encoding": encoding})
    assert got.encode() == expected


starts = st.builds(
    p.StartMessage,
    id=ids, name=names, state=st.integers(0, 6), image_url=st.text(max_size=40).filter(lambda s: "\x00" not in s),
    file=st.binary(min_size=1, max_size=64), inputs=st.lists(text.filter(lambda s: len(s.encode()) <= 80),
                                                             max_size=16).map(tuple),
    cli_args=st.lists(short_text, max_size=3).map(tuple), broadcast=st.booleans(), daemon=st.booleans(),
    env=st.dictionaries(short_text, short_text, max_size=3), proplet_id=st.just("") | ids,
    wasm_digest=st.just("") | digests, wasm_signature=st.just("") | signatures, limits=limits,
    attempt=st.integers(0, 2**31), traceparent=short_text,
)


@CHECKS
@given(msg=starts)
def test_starts_decode_like_python(c_side: Wirecheck, msg: p.StartMessage) -> None:
    payload = p.encode_start(msg).decode()
    expected = p.decode_start(payload)
    got = orjson.loads(c_side.ask({"op": "start", "payload": payload}))
    assert got["ok"], got
    assert got["id"] == expected.id
    assert got["name"] == expected.name
    assert got["image_url"] == expected.image_url
    assert got["proplet_id"] == expected.proplet_id
    assert got["broadcast"] == expected.broadcast
    assert tuple(got["inputs"]) == expected.inputs
    assert got["digest"] == expected.wasm_digest
    assert bytes.fromhex(got["signature_hex"]) == base64.b64decode(expected.wasm_signature)
    assert got["attempt"] == expected.attempt
    assert float(got["timeout_s"]) == (expected.limits.timeout_s or 0)
    assert int(got["fuel"]) == (expected.limits.fuel or 0)
    assert int(got["memory_bytes"]) == (expected.limits.memory_bytes or 0)
    assert got["traceparent"] == expected.traceparent
    assert got["file_b64_len"] == len(orjson.loads(payload)["file"])


chunks = st.builds(
    p.ChunkMessage, app_name=ids, chunk_idx=st.integers(0, 9), total_chunks=st.integers(10, 600),
    data=st.binary(max_size=64), digest=st.just("") | digests, size=st.integers(0, 2**40), error=text,
)


@CHECKS
@given(msg=chunks)
def test_chunks_decode_like_python(c_side: Wirecheck, msg: p.ChunkMessage) -> None:
    payload = p.encode_chunk(msg).decode()
    expected = p.decode_chunk(payload)
    got = orjson.loads(c_side.ask({"op": "chunk", "payload": payload}))
    assert got["ok"], got
    assert (got["app_name"], got["chunk_idx"], got["total_chunks"], int(got["size"]), got["digest"]) == (
        expected.app_name, expected.chunk_idx, expected.total_chunks, expected.size, expected.digest)
    assert got["error"] == expected.error[:300]


@CHECKS
@given(msg=chunks)
def test_binary_chunks_decode_like_python(c_side: Wirecheck, msg: p.ChunkMessage) -> None:
    payload = p.encode_binary_chunk(msg)
    expected = p.decode_binary_chunk(payload)
    got = orjson.loads(c_side.ask({"op": "binary_chunk", "payload": base64.b64encode(payload).decode()}))
    assert got["ok"], got
    assert (got["app_name"], got["chunk_idx"], got["total_chunks"], int(got["size"]), got["digest"]) == (
        expected.app_name, expected.chunk_idx, expected.total_chunks, expected.size, expected.digest)
    assert bytes.fromhex(got["data_hex"]) == bytes(expected.data)
    assert got["error"] == expected.error[:300]


@CHECKS
@given(task_id=ids, proplet_id=ids, attempt=st.integers(0, 2**31),
       more=st.lists(st.tuples(ids, st.integers(0, 2**31)), max_size=20))
def test_result_acks_decode_like_python(c_side: Wirecheck, task_id: str, proplet_id: str, attempt: int,
                                        more: list[tuple[str, int]]) -> None:
    payload = p.encode_result_ack(p.ResultAckMessage(task_id, proplet_id, attempt, tuple(more))).decode()
    expected = p.decode_result_ack(payload)
    got = orjson.loads(c_side.ask({"op": "result_ack", "payload": payload}))
    assert got["ok"], got
    assert got["proplet_id"] == expected.proplet_id
    # The device reads at most its first PROTOCOL_ACKS_MAX (16); the rest are acknowledged again later.
    pairs = [(expected.task_id, expected.attempt), *expected.more][:16]
    assert [tuple(a) for a in got["acks"]] == pairs


@CHECKS
@given(payload=st.binary(max_size=200).map(lambda b: b.decode("latin-1").replace("\x00", "")))
def test_what_python_refuses_the_c_side_refuses_too(c_side: Wirecheck, payload: str) -> None:
    """For stops (every field of which the device reads) the two decoders agree on validity."""
    try:
        p.decode_stop(payload)
        python_ok = True
    except p.InvalidMessage:
        python_ok = False
    got = orjson.loads(c_side.ask({"op": "stop", "payload": payload}))
    if not python_ok:
        assert not got["ok"], got


def test_the_managers_own_stop_and_start_are_understood(c_side: Wirecheck) -> None:
    stop = p.encode_stop(p.StopMessage("t-1", "esp-1", False)).decode()
    assert orjson.loads(c_side.ask({"op": "stop", "payload": stop})) == {
        "id": "t-1", "proplet_id": "esp-1", "broadcast": False, "ok": True}
    start = p.encode_start(p.StartMessage(id="t-2", name="add", file=b"\0asm\1\0\0\0", inputs=("1", "2"),
                                          proplet_id="esp-1", attempt=3)).decode()
    got = orjson.loads(c_side.ask({"op": "start", "payload": start}))
    assert got["ok"] and got["inputs"] == ["1", "2"] and got["attempt"] == 3


def test_signatures_made_by_the_manager_verify_in_c_with_python_s_verdicts(c_side: Wirecheck, tmp_path: Path) -> None:
    """core/signing.py (cryptography) signs and writes the PEM files; the C core (libsodium) reads
    them and reaches core.signing.verify_digest's verdict on every start, in the same words."""
    from core.signing import (
        SignatureError,
        generate_keypair,
        load_private_key,
        load_public_keys,
        sign_digest,
        verify_digest,
    )

    private, public = generate_keypair(tmp_path / "a")
    other_private, other_public = generate_keypair(tmp_path / "b", "b")
    key, other_key = load_private_key(private), load_private_key(other_private)
    trusted = load_public_keys([public])
    pems = [public.read_text(), other_public.read_text()]

    def verdicts(digest: str, signature: str) -> tuple[str, str]:
        try:
            verify_digest(trusted, digest, signature)
            python = ""
        except SignatureError as exc:
            python = str(exc)
        start = p.encode_start(p.StartMessage(id="t-1", name="add", file=b"\0asm\1\0\0\0", wasm_digest=digest,
                                              wasm_signature=signature)).decode()
        got = orjson.loads(c_side.ask({"op": "trust", "pems": pems[:1], "payload": start}))
        assert got["ok"] == (python == ""), (got, python)
        return python, got["error"]

    for n in range(40):
        digest = p.sha256_digest(n.to_bytes(4, "big"))
        assert verdicts(digest, sign_digest(key, digest)) == ("", "")
        python, c = verdicts(digest, sign_digest(other_key, digest))
        foreign = f"the signature of module {digest} is not from a key this proplet trusts; check "
        assert python.startswith(foreign) and c.startswith(foreign)
        # Signed for another module's digest: refused just the same.
        python, c = verdicts(digest, sign_digest(key, p.sha256_digest(b"other")))
        assert python.startswith(foreign) and c.startswith(foreign)
    digest = p.sha256_digest(b"x")
    assert verdicts(digest, "") == ((expected := f"the module {digest} is not signed, and this proplet only runs "
                                     "signed modules; configure MANAGER_SIGNING_KEY on the manager"), expected)
    python, c = verdicts("", sign_digest(key, digest))
    assert python == c and "names no module digest" in c
    # Both keys trusted: the second one's signatures pass too.
    start = p.encode_start(p.StartMessage(id="t-2", name="add", file=b"\0asm\1\0\0\0", wasm_digest=digest,
                                          wasm_signature=sign_digest(other_key, digest))).decode()
    assert orjson.loads(c_side.ask({"op": "trust", "pems": pems, "payload": start})) == {"ok": True, "error": ""}
