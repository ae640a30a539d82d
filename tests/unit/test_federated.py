"""Federated averaging and the FL request bodies (core/federated.py, core/schemas.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from core.federated import AggregationError, federated_average
from core.protocol import model_version
from core.schemas import ExperimentConfig, FLUpdate
from core.topics import fl_update_parts, fl_update_topic

B64 = base64.b64encode(b"\0asm\x01\0\0\0").decode()


def test_each_weight_is_averaged_by_sample_count() -> None:
    model = federated_average([(1, {"w": [1.0, 2.0], "b": 0.0}), (3, {"w": [5.0, 6.0], "b": 4.0})])
    assert model == {"w": [4.0, 5.0], "b": 3.0}


def test_nested_lists_and_weights_only_some_updates_have() -> None:
    model = federated_average([(2, {"layer": [[1, 2], [3, 4]], "extra": 10}), (2, {"layer": [[3, 4], [5, 6]]})])
    assert model == {"layer": [[2.0, 3.0], [4.0, 5.0]], "extra": 10.0}


def test_an_update_with_no_samples_still_counts_once() -> None:
    assert federated_average([(0, {"b": 2.0}), (1, {"b": 4.0})]) == {"b": 3.0}


@pytest.mark.parametrize("updates", [
    [(1, {"w": [1, 2]}), (1, {"w": [1, 2, 3]})],
    [(1, {"w": [1, 2]}), (1, {"w": 3})],
    [(1, {"w": "text"})],
    [(1, {"w": True})],
    [],
])
def test_weights_that_cannot_be_averaged_are_an_error(updates: list[tuple[int, dict[str, Any]]]) -> None:
    with pytest.raises(AggregationError):
        federated_average(updates)


@pytest.mark.parametrize(("ref", "version"), [
    ("global_model_v0", 0), ("global_model_v12", 12), ("models/7", 7), ("latest", 0), ("", 0),
    ("s3://models/global_model_v12.json", 12),  # the number after global_model_v, not the last one
    ("fl/models/v2/latest", 0),
])
def test_a_model_reference_names_its_version(ref: str, version: int) -> None:
    assert model_version(ref) == version


def test_an_update_topic_has_no_prefix_and_parses_back() -> None:
    assert fl_update_topic("r7", "p-1") == "fl/rounds/r7/updates/p-1"
    assert fl_update_parts("fl/rounds/r7/updates/p-1") == ("r7", "p-1")
    assert fl_update_parts("m/t/c/c/fl/rounds/r7/updates/p-1") is None


def config(**changes: Any) -> dict[str, Any]:
    body = {"round_id": "r1", "model_ref": "global_model_v0", "participants": ["p1", "p2"], "task_wasm_file": B64}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("changes", "message"), [
    ({"round_id": None}, "round_id"),
    ({"round_id": "bad id"}, "round_id"),
    ({"participants": []}, "participants"),
    ({"participants": ["p1", ""]}, "empty one"),
    ({"k_of_n": 3}, "only 2 participants"),
    ({"task_wasm_file": None}, "one of the two"),
    ({"task_wasm_image": "registry/x:1"}, "one of the two"),
    ({"task_wasm_file": "bm90IHdhc20="}, "not a WebAssembly module"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"initial_model": {"w": float("nan")}}, "non-finite"),
    ({"hyperparams": {"note": "a\u0000b"}}, "NUL"),
])
def test_an_invalid_experiment_says_what_is_wrong(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExperimentConfig.model_validate(config(**changes))


def test_repeated_participants_count_once() -> None:
    assert ExperimentConfig.model_validate(config(participants=["p1", "p2", "p1"])).participants == ["p1", "p2"]


@pytest.mark.parametrize(("body", "message"), [
    ({"round_id": "r1", "proplet_id": "p1", "update": {}}, "empty"),
    ({"round_id": "r1", "update": {"w": [1]}}, "proplet_id"),
    ({"proplet_id": "p1", "update": {"w": [1]}}, "round_id"),
    ({"round_id": "r1", "proplet_id": "p1", "update": {"w": [float("inf")]}}, "non-finite"),
    ({"round_id": "r1", "proplet_id": "p1", "update": {"w": [2**70]}}, "64 bits"),
    ({"round_id": "r1", "proplet_id": "p1", "num_samples": -1, "update": {"w": [1]}}, "num_samples"),
])
def test_an_invalid_update_says_what_is_wrong(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FLUpdate.model_validate(body)
