"""The pure parts of a rank of a split model: its layers, its Rank's checks, the hostfile, telling
a broken ring from other failures, the watch over the ring's connections, the seed rank 0 fixes,
and the partial model directory a rank loads from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest
from safetensors.numpy import load_file, save_file

from exod.errors import ExoError
from exod.models.shape import layer_of
from exod.proto.exo.v1 import runner_pb2
from exod.runners.lockstep import seeded
from exod.runners.partial import keeps, write_partial
from exod.runners.ring import check_rank, hostfile, is_ring_failure, layer_range
from exod.runners.ring_watch import Connection, broken, parse_host, ring_connections
from tests import models

HOSTS = ["127.0.0.1:47101", "127.0.0.1:47102", "127.0.0.1:47103"]
EST = psutil.CONN_ESTABLISHED


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ([1, 4], [range(4, 5), range(0, 4)]),
        ([4, 1], [range(1, 5), range(0, 1)]),
        ([2, 1, 2], [range(3, 5), range(2, 3), range(0, 2)]),
    ],
)
def test_rank_0_holds_the_last_layers_and_the_last_rank_the_first(
    split: list[int], expected: list[range]
) -> None:
    assert [layer_range(split, r) for r in range(len(split))] == expected


def _rank(**fields: object) -> runner_pb2.Rank:
    base: dict[str, object] = {"rank": 0, "size": 2, "split": [1, 4], "hosts": HOSTS[:2]}
    return runner_pb2.Rank(**(base | fields))  # type: ignore[arg-type]  # test fields by name


def test_a_consistent_rank_passes() -> None:
    check_rank(_rank(), 5)
    check_rank(_rank(rank=2, size=3, split=[2, 1, 2], hosts=HOSTS), 5)


@pytest.mark.parametrize(
    ("fields", "layers", "words"),
    [
        ({"size": 1, "split": [5], "hosts": HOSTS[:1]}, 5, "a ring of 1 ranks"),
        ({"rank": 2}, 5, "rank 2 of 2"),
        ({"split": [1, 2, 2]}, 5, "3 layer counts and 2 hosts for 2 ranks"),
        ({"split": [0, 5]}, 5, "leaves a rank without layers"),
        ({"split": [1, 1]}, 5, "covers 2 layers of 5"),
        ({"hosts": ["127.0.0.1", "127.0.0.1:47102"]}, 5, "are not all ip:port"),
        ({"hosts": ["127.0.0.1:0", "127.0.0.1:47102"]}, 5, "are not all ip:port"),
    ],
)
def test_an_impossible_rank_is_refused_as_internal(
    fields: dict[str, object], layers: int, words: str
) -> None:
    with pytest.raises(ExoError) as e:
        check_rank(_rank(**fields), layers)
    assert e.value.reason == "internal"
    assert words in e.value.message


def test_the_hostfile_lists_one_address_per_rank_in_rank_order() -> None:
    assert json.loads(hostfile(HOSTS[:2])) == [["127.0.0.1:47101"], ["127.0.0.1:47102"]]


def test_only_mlx_ring_errors_are_ring_failures() -> None:
    assert is_ring_failure(RuntimeError("[ring] connection to a peer was lost"))
    assert not is_ring_failure(RuntimeError("[metal] out of memory"))
    assert not is_ring_failure(ValueError("[ring] not a RuntimeError"))


def test_hosts_are_parsed_to_one_spelling() -> None:
    assert parse_host("127.0.0.1:47101") == ("127.0.0.1", 47101)
    assert parse_host("[::1]:47101") == ("::1", 47101)


def _conn(local: str, remote: str) -> Connection:
    return parse_host(local), parse_host(remote)


def test_the_ring_connections_are_the_accepted_ones_and_those_to_peers() -> None:
    accepted = _conn("127.0.0.1:47101", "127.0.0.1:50000")
    made = _conn("127.0.0.1:50001", "127.0.0.1:47102")
    other = _conn("127.0.0.1:50002", "10.0.0.9:443")
    closing = _conn("127.0.0.1:50003", "127.0.0.1:47103")
    seen = [(accepted, EST), (made, EST), (other, EST), (closing, psutil.CONN_CLOSE_WAIT)]
    assert ring_connections(seen, HOSTS, 0) == {accepted, made}


def test_the_ring_is_broken_once_a_watched_connection_is_not_established() -> None:
    a = _conn("127.0.0.1:47101", "127.0.0.1:50000")
    b = _conn("127.0.0.1:50001", "127.0.0.1:47102")
    assert not broken({a, b}, [(a, EST), (b, EST)])
    assert broken({a, b}, [(a, EST), (b, psutil.CONN_CLOSE_WAIT)])  # the peer closed its end
    assert broken({a, b}, [(a, EST)])  # closed here too: gone


def test_rank_0_seeds_a_sampled_request_without_a_seed_and_nothing_else() -> None:
    greedy = runner_pb2.Generate(request_id="g")
    assert seeded(greedy) is greedy
    chosen = runner_pb2.Generate(request_id="s", temperature=0.7, has_seed=True, seed=3)
    assert seeded(chosen) is chosen
    free = runner_pb2.Generate(request_id="f", temperature=0.7)
    fixed = seeded(free)
    assert fixed.has_seed and fixed.seed >= 0
    assert not free.has_seed  # the daemon's request is left as it came
    assert fixed.temperature == free.temperature and fixed.request_id == "f"


# --- partial model directories ------------------------------------------------------------------


def test_a_tensor_belongs_to_its_layer_or_to_every_rank() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("language_model.model.layers.3.self_attn.q_proj.bias") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert keeps("model.norm.weight", range(0, 1))
    assert keeps("model.layers.2.input_layernorm.weight", range(1, 3))
    assert not keeps("model.layers.3.input_layernorm.weight", range(1, 3))


def test_a_partial_directory_holds_its_layers_and_the_shared_tensors(tmp_path: Path) -> None:
    full = models.demo_model("qwen2", num_layers=5)
    dest = write_partial(full, tmp_path / "part", range(1, 3))
    every = load_file(full / "model.safetensors")
    part = load_file(dest / "model.safetensors")
    assert set(part) == {n for n in every if keeps(n, range(1, 3))}
    assert {layer_of(n) for n in part} == {None, 1, 2}
    assert "model.embed_tokens.weight" in part
    for name, array in part.items():
        assert (array == every[name]).all(), name
    # Config and tokenizer travel too; the model's README does not.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dest / name).read_bytes() == (full / name).read_bytes()
    assert not (dest / "README.md").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["part"]  # no temporary directory left


def test_a_sharded_model_keeps_its_shard_names_and_a_matching_index(tmp_path: Path) -> None:
    full = tmp_path / "sharded"
    shutil.copytree(models.demo_model("qwen2", num_layers=5), full)
    tensors = load_file(full / "model.safetensors")
    (full / "model.safetensors").unlink()
    first = {n: a for n, a in tensors.items() if (layer_of(n) or 0) < 3}
    second = {n: a for n, a in tensors.items() if n not in first}
    save_file(first, full / "model-00001-of-00002.safetensors")
    save_file(second, full / "model-00002-of-00002.safetensors")
    weight_map = dict.fromkeys(first, "model-00001-of-00002.safetensors")
    weight_map |= dict.fromkeys(second, "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": weight_map}
    (full / "model.safetensors.index.json").write_text(json.dumps(index))

    dest = write_partial(full, tmp_path / "part", range(3, 5))
    kept = {n for n in tensors if keeps(n, range(3, 5))}
    shards = sorted(p.name for p in dest.glob("model*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    held = set(load_file(dest / shards[0])) | set(load_file(dest / shards[1]))
    assert held == kept
    written = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(written["weight_map"]) == kept
    assert written["weight_map"]["model.layers.4.mlp.up_proj.weight"] == shards[1]
    assert written["metadata"]["total_size"] == sum(tensors[n].nbytes for n in kept)


def test_a_shard_with_no_tensor_of_the_range_is_not_written(tmp_path: Path) -> None:
    full = tmp_path / "sharded"
    shutil.copytree(models.demo_model("qwen2", num_layers=5), full)
    tensors = load_file(full / "model.safetensors")
    (full / "model.safetensors").unlink()
    save_file({n: a for n, a in tensors.items() if layer_of(n) == 4}, full / "model-b.safetensors")
    save_file({n: a for n, a in tensors.items() if layer_of(n) != 4}, full / "model-a.safetensors")
    dest = write_partial(full, tmp_path / "part", range(0, 2))
    assert [p.name for p in dest.glob("model*.safetensors")] == ["model-a.safetensors"]


def test_an_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "part").mkdir()
    with pytest.raises(FileExistsError):
        write_partial(models.demo_model("qwen2", num_layers=5), tmp_path / "part", range(0, 1))
