"""Federated-learning rounds as the console shows them, and the start-a-round form's checks.

Nothing here imports Textual. Rows are immutable copies made on the core's loop (a running round is
the core's own object, changed by its round loop), so the console's thread never reads one mid-change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from console.modules import FormErrors, ModuleSource

if TYPE_CHECKING:
    from core.domain import FLRound, FLUpdateRecord

# Rounds listed by the view (newest first); older ones are reached with `propeller fl rounds --offset`.
ROUNDS_SHOWN = 200


def model_name(version: int | None) -> str:
    return "" if version is None else f"v{version}"


@dataclass(frozen=True, slots=True)
class RoundRow:
    round_id: str
    experiment_id: str
    state: str  # running | completed | failed
    updates: int
    needed: int  # updates that complete it (k_of_n)
    asked: tuple[str, ...]  # participants named in the request
    started: tuple[str, ...]  # those that were online and got a task
    model_in: int  # the version it trains from
    model_out: int | None  # the version it made, once completed
    task_wasm_image: str
    hyperparams: str  # JSON text
    timeout_s: float
    created_at: datetime
    deadline: datetime
    completed_at: datetime | None
    reason: str

    @classmethod
    def of(cls, r: FLRound, updates: int) -> RoundRow:
        from core.protocol import model_version

        return cls(r.round_id, r.experiment_id, str(r.state), updates, r.k_of_n, tuple(r.participants),
                   tuple(r.started), model_version(r.model_ref), r.model_version, r.task_wasm_image,
                   json.dumps(r.hyperparams, sort_keys=True), r.timeout_s, r.created_at, r.deadline,
                   r.completed_at, r.reason)

    def search_text(self) -> tuple[str, ...]:
        return (self.round_id, self.experiment_id, self.state, self.reason, *self.started)


@dataclass(frozen=True, slots=True)
class UpdateRow:
    proplet_id: str
    num_samples: int
    source: str  # rest, cbor, mqtt or result
    received_at: datetime
    metrics: str  # "loss=0.091 accuracy=0.97"
    weights: str  # "w: 3 values, b: 1 value"

    @classmethod
    def of(cls, u: FLUpdateRecord) -> UpdateRow:
        metrics = u.body.get("metrics")
        shown = " ".join(f"{k}={_short(v)}" for k, v in sorted(metrics.items())) if isinstance(metrics, dict) else ""
        return cls(u.proplet_id, u.num_samples, u.source, u.received_at, shown, weights_summary(u.body.get("update")))


@dataclass(frozen=True, slots=True)
class ModelRow:
    version: int
    round_id: str  # the round that made it; "" for a starting model
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RoundsView:
    """One poll of the manager: the newest rounds, the models, and who coordinates."""

    total: int
    rounds: tuple[RoundRow, ...]
    models: tuple[ModelRow, ...]
    coordinator: str  # the external coordinator's URL when the manager only relays, else ""


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def weights_summary(weights: Any, limit: int = 6) -> str:
    """`name: shape` of each weight of an update or model, for a table cell (`propeller fl model N` prints
    the values)."""
    if not isinstance(weights, dict):
        return ""
    parts = [f"{name}: {_shape(value)}" for name, value in list(weights.items())[:limit]]
    more = len(weights) - limit
    return ", ".join(parts) + (f", … {more} more" if more > 0 else "")


def _shape(value: Any) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], list):
            return f"{len(value)}×{len(value[0])}"
        return f"{len(value)} value{'s' if len(value) != 1 else ''}"
    return _short(value)


@dataclass(slots=True)
class RoundForm:
    """The start-a-round form's raw text fields."""

    module: str = ""
    round_id: str = ""
    model: str = ""  # a version number, vN or global_model_vN; empty: the newest stored, else v0
    participants: str = ""  # ids separated by commas or spaces; empty: every online proplet
    k_of_n: str = ""
    timeout_s: str = ""
    hyperparams: str = ""  # a JSON object


def build_experiment(form: RoundForm, module: ModuleSource | None, *, online: list[str], latest_model: int | None,
                     default_round_id: str) -> dict[str, Any]:
    """The POST /fl/experiments body. Every field problem is collected (FormErrors) so the form can show them
    all at once; core.schemas.ExperimentConfig validates the rest."""
    errors: dict[str, str] = {}
    body: dict[str, Any] = {"round_id": form.round_id.strip() or default_round_id}
    if module is not None:
        body.update({"task_wasm_file": module.body_fields()["file"]} if module.kind == "file"
                    else {"task_wasm_image": module.text})
    model = form.model.strip().removeprefix("global_model_").removeprefix("v")
    if not model:
        body["model_ref"] = f"global_model_v{latest_model or 0}"
    elif model.isdecimal() and model.isascii():
        body["model_ref"] = f"global_model_v{int(model)}"
    else:
        errors["model"] = f"{form.model.strip()!r} is not a model version: type a number (3), v3 or global_model_v3."
    participants = [p for p in form.participants.replace(",", " ").split() if p]
    if not participants:
        if not online:
            errors["participants"] = "No proplet is online: launch some (:local) or name the participants."
        participants = online
    body["participants"] = participants
    for name, text, kind in (("k_of_n", form.k_of_n, int), ("timeout_s", form.timeout_s, float)):
        text = text.strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            errors[name] = f"{text!r} is not a {'whole ' if kind is int else ''}number."
            continue
        if value < 0 or (kind is float and value == 0):
            errors[name] = "Give a positive number." if kind is float else "Give 0 (every participant) or more."
            continue
        body[name] = value
    if form.hyperparams.strip():
        try:
            hyper = json.loads(form.hyperparams)
        except json.JSONDecodeError as exc:
            errors["hyperparams"] = f"Not JSON ({exc.msg} at character {exc.pos}): write an object such as " \
                                    '{"lr": 0.01, "epochs": 5}.'
        else:
            if isinstance(hyper, dict):
                body["hyperparams"] = hyper
            else:
                errors["hyperparams"] = 'Write a JSON object such as {"lr": 0.01, "epochs": 5}.'
    if errors:
        raise FormErrors(errors)
    return body


ROUND_FIELDS = ("module", "round_id", "model", "participants", "k_of_n", "timeout_s", "hyperparams")


def round_errors_by_field(message: str) -> dict[str, str]:
    """The manager's refusal put next to the field it is about: ExperimentConfig's validation
    ("round_id: …; participants: …"), or one of the round's own checks (an unknown model, a round id
    taken, no participant online), which name no field and are told apart by what they say."""
    out: dict[str, str] = {}
    parts = message.split("; ")
    if not all(part.partition(": ")[0].split(".")[0] in _LOCATIONS for part in parts):
        parts = [message]  # a sentence of its own, not a list of fields
    for part in parts:
        loc, sep, text = part.partition(": ")
        key = _LOCATIONS.get(loc.split(".")[0]) if sep else None
        if key is None:
            key, text = _field_named_by(part), part
        out[key] = (out.get(key, "") + " " + text).strip()
    return out


_LOCATIONS = {**{name: name for name in ROUND_FIELDS}, "task_wasm_file": "module", "task_wasm_image": "module",
              "model_ref": "model", "experiment_id": "round_id"}


def _field_named_by(message: str) -> str:
    text = message.lower()
    for words, field_name in ((("model version", "model_ref", "initial_model"), "model"),
                              (("round ",), "round_id"), (("participant", "online"), "participants")):
        if any(w in text for w in words):
            return field_name
    return "form"
