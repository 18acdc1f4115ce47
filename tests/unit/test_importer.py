"""The import's pure parts: reading the converter's lines, and when an import must not start."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from exod.errors import ExoError
from exod.eventlog import ModelView
from exod.eventlog.fold import EMPTY, decode, encode
from exod.models.importer import Finished, parse_line, refusal
from exod.proto.exo.v1 import control_pb2

DEST = Path("/h/models/m")


def test_progress_lines() -> None:
    line = {"tensors_done": 3, "tensors_total": 20, "bytes_done": 10, "bytes_total": 99}
    assert parse_line(json.dumps(line)) == control_pb2.ImportProgress(**line)


def test_the_final_line() -> None:
    assert parse_line('{"done": "/x", "content_hash": "ab"}') == Finished("ab")


def test_an_error_line_keeps_its_reason_and_message() -> None:
    err = parse_line('{"error": "weights_corrupt", "message": "cut short: copy it again"}')
    assert isinstance(err, ExoError)
    assert (err.reason, err.message) == ("weights_corrupt", "cut short: copy it again")


def test_an_unknown_reason_is_internal() -> None:
    err = parse_line('{"error": "no_such_reason", "message": "m"}')
    assert isinstance(err, ExoError) and err.reason == "internal"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"tensors_done": 1}',
        '{"tensors_done": -1, "tensors_total": 2, "bytes_done": 0, "bytes_total": 0}',
        '{"tensors_done": true, "tensors_total": 2, "bytes_done": 0, "bytes_total": 0}',
        '{"done": "/x"}',
    ],
)
def test_other_lines_are_ignored(text: str) -> None:
    assert parse_line(text) is None


def model(name: str, path: Path, *, owned: bool = True) -> ModelView:
    return ModelView(name=name, path=str(path), content_hash="h", owned=owned)


def test_a_new_name_into_a_free_directory_may_start() -> None:
    assert refusal({}, "m", dest=DEST, dest_exists=False, force=False, source="/a.gguf") is None


def test_a_registered_name_needs_force() -> None:
    models = {"m": model("m", DEST)}
    err = refusal(models, "m", dest=DEST, dest_exists=True, force=False, source="/a b.gguf")
    assert err is not None and err.reason == "invalid_argument"
    assert err.message == (
        f"the name 'm' is already registered to {DEST}: choose another name, or replace it "
        "with `exoctl models add m '/a b.gguf' --force`"
    )
    assert refusal(models, "m", dest=DEST, dest_exists=True, force=True, source="/a") is None


def test_another_names_directory_is_never_replaced() -> None:
    models = {"other": model("other", DEST, owned=False)}
    err = refusal(models, "m", dest=DEST, dest_exists=True, force=True, source="/a")
    assert err is not None and "registered model 'other'" in err.message


def test_a_stray_directory_is_replaced_only_with_force() -> None:
    err = refusal({}, "m", dest=DEST, dest_exists=True, force=False, source="/a")
    assert err is not None and err.message.startswith(f"{DEST} exists but is no registered model")
    assert refusal({}, "m", dest=DEST, dest_exists=True, force=True, source="/a") is None


def test_owned_and_stop_survive_a_snapshot_and_old_snapshots_read_as_defaults() -> None:
    view = ModelView(name="m", path="/p", content_hash="h", owned=True, stop=("<|im_end|>",))
    state = replace(EMPTY, models={"m": view})
    assert decode(encode(state)).models["m"] == view
    old = json.loads(encode(state))
    for entry in old["models"]:
        del entry["owned"], entry["stop"]
    assert decode(json.dumps(old).encode()).models["m"] == ModelView("m", "/p", "h")
