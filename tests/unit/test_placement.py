"""placement: where a model runs over a cluster's members, as a pure function.

Each cluster shape is checked against the exact plan: the preference order (loaded already,
this node, the one member with room, a split), the split's rule (in proportion to each member's
room for layers, at least one layer each, largest remainder, mlx-lm's rank order with this node
as rank 0), every refusal with its reason and its numbers, and placements forced with --on.
A brute-force check over many small clusters states the split's guarantees.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from exod.cluster.placement import (
    Member,
    Plan,
    Rank,
    Refused,
    apportion,
    layout,
    place,
    usable_memory,
)
from exod.errors import REASONS, Exit
from exod.models.shape import Shape
from exod.runners.admission import RUNTIME_OVERHEAD, WEIGHT_FACTOR, estimate

GIB = 1 << 30
ME = "n-000000000001"
B = "n-00000000000b"
C = "n-00000000000c"
D = "n-00000000000d"


def model(
    layers: int = 8, layer: int = GIB, shared: int = GIB // 2, pipeline: bool = True
) -> Shape:
    return Shape("qwen2", (layer,) * layers, shared, pipeline=pipeline)


def room_for(layer_bytes: float, shape: Shape) -> int:
    """A member's room that holds exactly `layer_bytes` of layers beside the shared tensors."""
    return RUNTIME_OVERHEAD + math.ceil(WEIGHT_FACTOR * (shape.shared_bytes + layer_bytes))


def me(room: int, **kw: object) -> Member:
    return Member(ME, room, state="self", has_model=True, **kw)  # type: ignore[arg-type]  # test kwargs


def peer(node: str, room: int, state: str = "alive", has_model: bool = False) -> Member:
    return Member(node, room, state=state, has_model=has_model)


def whole(shape: Shape, node: str, *, loaded: bool = False) -> Plan:
    return Plan(
        whole_on=node,
        ranks=(Rank(0, node, 0, shape.layers - 1, estimate(shape.total_bytes)),),
        loaded=loaded,
    )


def split(shape: Shape, *ranks: tuple[str, int, int]) -> Plan:
    """The plan with these (node, first, last) ranks, rank 0 first, bytes as a rank needs."""
    return Plan(
        ranks=tuple(
            Rank(r, node, first, last, estimate(shape.bytes_of(first, last) + shape.shared_bytes))
            for r, (node, first, last) in enumerate(ranks)
        )
    )


def refused(plan: Plan) -> Refused:
    assert plan.whole_on is None and plan.ranks == ()
    assert plan.refused is not None
    return plan.refused


# --- usable memory and apportion ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("free", "reserved", "cap", "expected"),
    [
        (10 * GIB, 2 * GIB, 0, 8 * GIB),  # no cap known (a peer from before it was sent)
        (10 * GIB, 2 * GIB, 4 * GIB, 4 * GIB),  # one runner may take no more than the cap
        (10 * GIB, 2 * GIB, 9 * GIB, 8 * GIB),
        (GIB, 2 * GIB, 4 * GIB, 0),  # the reserve is more than is free: nothing, never negative
        (10 * GIB, 0, 0, 10 * GIB),  # a peer from before the reserve was sent
    ],
)
def test_usable_memory(free: int, reserved: int, cap: int, expected: int) -> None:
    assert usable_memory(free, reserved, cap) == expected


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (8, [1, 1], [4, 4]),
        (8, [3, 1], [6, 2]),
        (9, [1, 1], [5, 4]),  # a tie goes to the earlier taker
        (8, [1, 1, 1], [3, 3, 2]),
        (10, [1, 1, 1], [4, 3, 3]),
        (7, [5, 3], [4, 3]),  # quotas 4.375 and 2.625: the larger remainder gets the extra one
        (3, [100, 1, 1], [1, 1, 1]),  # at least one each, even far below the quota
        (10, [100, 1, 1], [8, 1, 1]),
        (5, [0, 0], [3, 2]),  # no weight at all: equal shares
        (4, [1], [4]),
    ],
)
def test_apportion(total: int, weights: list[int], expected: list[int]) -> None:
    assert apportion(total, weights) == expected


def test_apportion_is_proportional_within_one_and_at_least_one_each() -> None:
    rng = random.Random(12)
    for _ in range(2000):
        n = rng.randint(1, 6)
        total = rng.randint(n, 40)
        weights = [rng.randint(1, 1000) for _ in range(n)]
        counts = apportion(total, weights)
        assert sum(counts) == total and min(counts) >= 1
        quotas = [total * w / sum(weights) for w in weights]
        for count, quota in zip(counts, quotas, strict=True):
            # Less than one above its quota (largest remainder), or the minimum of one.
            assert count < quota + 1 or count == 1
            if min(quotas) >= 1:  # no minimum given to anyone: less than one below too
                assert count > quota - 1


@pytest.mark.parametrize(("total", "takers"), [(2, 3), (0, 1), (3, 0)])
def test_apportion_needs_one_item_per_taker(total: int, takers: int) -> None:
    with pytest.raises(ValueError, match="at least one each"):
        apportion(total, [1] * takers)


def test_layout_follows_mlx_lm_rank_order() -> None:
    # pipeline.py: rank r runs the layers after those of ranks r+1 ... size-1.
    shape = Shape("qwen2", (1, 2, 3, 4, 5, 6), 10, pipeline=True)
    ranks = layout(shape, ["x", "y", "z"], [1, 2, 3])
    assert [(r.rank, r.node, r.first_layer, r.last_layer) for r in ranks] == [
        (0, "x", 5, 5),
        (1, "y", 3, 4),
        (2, "z", 0, 2),
    ]
    assert [r.bytes for r in ranks] == [estimate(16), estimate(19), estimate(16)]


# --- whole placements ---------------------------------------------------------------------------


def test_one_node_that_fits_holds_it_whole() -> None:
    shape = model()
    assert place(shape, [me(20 * GIB)], local_id=ME) == whole(shape, ME)


def test_this_node_first_when_it_fits_though_another_has_more_room() -> None:
    shape = model()
    members = [peer(B, 100 * GIB, has_model=True), me(estimate(shape.total_bytes))]
    assert place(shape, members, local_id=ME) == whole(shape, ME)


def test_fits_on_one_other_member_only() -> None:
    shape = model()
    members = [me(2 * GIB), peer(B, 20 * GIB), peer(C, 3 * GIB)]
    assert place(shape, members, local_id=ME) == whole(shape, B)


def test_of_several_that_fit_the_one_with_the_files_then_the_most_room() -> None:
    shape = model()
    members = [me(GIB), peer(B, 20 * GIB), peer(C, 30 * GIB), peer(D, 12 * GIB)]
    assert place(shape, members, local_id=ME) == whole(shape, C)
    members[3] = peer(D, 12 * GIB, has_model=True)  # nothing to send there
    assert place(shape, members, local_id=ME) == whole(shape, D)


def test_already_loaded_elsewhere_wins_over_this_node() -> None:
    shape = model()
    members = [me(100 * GIB), peer(B, 0)]  # loaded: its memory is taken by this very model
    assert place(shape, members, local_id=ME, loaded_on=[B]) == whole(shape, B, loaded=True)
    # Loaded here and there: here.
    assert place(shape, members, local_id=ME, loaded_on=[B, ME]) == whole(shape, ME, loaded=True)


def test_loaded_on_a_member_that_is_not_reachable_does_not_count() -> None:
    shape = model()
    members = [me(100 * GIB), peer(B, 0, state="unreachable")]
    assert place(shape, members, local_id=ME, loaded_on=[B]) == whole(shape, ME)


@pytest.mark.parametrize("state", ["unreachable", "refused", "removed"])
def test_never_on_a_member_that_is_not_alive(state: str) -> None:
    shape = model()
    members = [me(GIB), peer(B, 100 * GIB, state=state), peer(C, 20 * GIB)]
    assert place(shape, members, local_id=ME) == whole(shape, C)
    only = [me(GIB), peer(B, 100 * GIB, state=state)]
    assert "no other member is reachable" in refused(place(shape, only, local_id=ME)).message


def test_a_model_with_no_layers_places_whole() -> None:
    shape = Shape("qwen2", (), GIB, pipeline=True)
    assert place(shape, [me(10 * GIB)], local_id=ME) == Plan(
        whole_on=ME, ranks=(Rank(0, ME, 0, 0, estimate(GIB)),)
    )


# --- splits -------------------------------------------------------------------------------------


def test_equal_memory_splits_evenly_this_node_rank_0_with_the_last_layers() -> None:
    shape = model(layers=8)
    room = room_for(4 * GIB, shape)
    plan = place(shape, [peer(B, room), me(room)], local_id=ME)
    assert plan == split(shape, (ME, 4, 7), (B, 0, 3))
    assert plan.ranks[0].bytes == estimate(4 * GIB + GIB // 2) <= room


def test_unequal_memory_splits_in_proportion_to_the_room_for_layers() -> None:
    shape = model(layers=8)
    members = [me(room_for(6 * GIB, shape)), peer(B, room_for(2 * GIB, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 2, 7), (B, 0, 1))
    # The same rooms the other way round: this node is still rank 0, with fewer layers.
    members = [me(room_for(2 * GIB, shape)), peer(B, room_for(6 * GIB, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 6, 7), (B, 0, 5))


def test_proportion_counts_the_room_beside_what_every_rank_keeps() -> None:
    # Free memory 9 and 5 GiB, but each rank keeps 2 GiB of embeddings and head and the runtime:
    # layers go 2:1 by room for layers, where free memory alone would say 9:5.
    shape = model(layers=9, shared=2 * GIB)
    members = [me(room_for(6 * GIB, shape)), peer(B, room_for(3 * GIB, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 3, 8), (B, 0, 2))


def test_three_members_largest_remainder_ties_go_to_the_earlier_rank() -> None:
    shape = model(layers=8)
    room = room_for(3 * GIB, shape)
    members = [peer(C, room), peer(B, room), me(room)]
    # 8/3 each: 2 + 2 + 2, the two left over to ranks 0 and 1 (this node, then by id).
    assert place(shape, members, local_id=ME) == split(shape, (ME, 5, 7), (B, 2, 4), (C, 0, 1))


def test_ranks_after_this_node_go_by_room() -> None:
    shape = model(layers=6)
    members = [me(room_for(2 * GIB, shape)), peer(B, room_for(2 * GIB, shape))]
    members.append(peer(C, room_for(4 * GIB, shape)))
    assert place(shape, members, local_id=ME) == split(shape, (ME, 4, 5), (C, 1, 3), (B, 0, 0))


def test_this_node_too_small_for_a_layer_is_left_out() -> None:
    shape = model(layers=4)
    members = [me(GIB // 2), peer(B, room_for(2 * GIB, shape)), peer(C, room_for(2 * GIB, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (B, 2, 3), (C, 0, 1))


def test_a_member_that_cannot_hold_its_one_layer_is_dropped() -> None:
    shape = model(layers=16)
    big = room_for(10 * GIB, shape)
    members = [me(big), peer(B, big), peer(C, room_for(GIB // 2, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 8, 15), (B, 0, 7))


def test_more_members_than_layers_uses_those_with_the_most_room() -> None:
    shape = model(layers=3)
    members = [
        me(room_for(GIB, shape)),
        peer(B, room_for(1.5 * GIB, shape)),
        peer(C, room_for(1.2 * GIB, shape)),
        peer(D, room_for(1.1 * GIB, shape)),
        peer("n-00000000000e", room_for(GIB, shape)),
    ]
    # B, C and D have the most; this node is not among them.
    assert place(shape, members, local_id=ME) == split(shape, (B, 2, 2), (C, 1, 1), (D, 0, 0))


def test_rounding_that_overflows_a_rank_moves_a_layer_to_one_with_room() -> None:
    # Rooms of just over 3.5 and 6.5 GiB for ten layers of 0.9 GiB: by largest remainder rank
    # 0 gets 4 layers (3.6 GiB), more than it holds; one moves to rank 1, which holds 7 (6.3).
    shape = model(layers=10, layer=9 * GIB // 10)
    members = [me(room_for(3.5 * GIB + 4096, shape)), peer(B, room_for(6.5 * GIB, shape))]
    assert apportion(10, [3 * GIB + GIB // 2 + 4096, 6 * GIB + GIB // 2]) == [4, 6]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 7, 9), (B, 0, 6))


def test_uneven_layers_are_counted_byte_for_byte() -> None:
    # Two small layers, then two large ones (as DeepSeek's dense layers before its MoE ones):
    # two layers each would put 8 GiB on rank 0; one layer moves to rank 1 (1 + 1 + 4 = 6 GiB).
    shape = Shape("deepseek_v3", (GIB, GIB, 4 * GIB, 4 * GIB), GIB, pipeline=True)
    members = [me(room_for(6 * GIB, shape)), peer(B, room_for(6 * GIB, shape))]
    assert place(shape, members, local_id=ME) == split(shape, (ME, 3, 3), (B, 0, 2))
    # With room for 5 GiB each, no contiguous split fits (2 + 8, or 6 + 4).
    members = [me(room_for(5 * GIB, shape)), peer(B, room_for(5 * GIB, shape))]
    assert refused(place(shape, members, local_id=ME)).reason == "model_too_large"


def test_split_guarantees_over_many_clusters() -> None:
    """Whatever the rooms: a split covers every layer once, contiguously, in mlx-lm's order, at
    least one layer per rank, each rank within its member's room; and a refusal only when no
    member fits the whole model."""
    rng = random.Random(7)
    for _ in range(1500):
        layers = rng.randint(2, 12)
        shape = model(layers=layers, layer=rng.randint(1, 8) * GIB // 4, shared=GIB // 4)
        rooms = [rng.randint(0, 12) * GIB // 2 for _ in range(rng.randint(1, 5))]
        members = [me(rooms[0])] + [peer(f"n-{i:012x}", r) for i, r in enumerate(rooms[1:], 2)]
        plan = place(shape, members, local_id=ME)
        by_id = {m.id: m for m in members}
        if plan.refused is not None:
            assert all(estimate(shape.total_bytes) > m.room for m in members)
            continue
        if plan.whole_on is not None:
            assert plan.ranks[0].bytes <= by_id[plan.whole_on].room
            continue
        ranks = plan.ranks
        assert [r.rank for r in ranks] == list(range(len(ranks)))
        assert ranks[-1].first_layer == 0 and ranks[0].last_layer == layers - 1
        for above, below in itertools.pairwise(ranks):
            assert below.last_layer + 1 == above.first_layer
        assert len({r.node for r in ranks}) == len(ranks)
        for r in ranks:
            assert r.first_layer <= r.last_layer
            assert r.bytes <= by_id[r.node].room


# --- refusals -----------------------------------------------------------------------------------


def test_one_node_too_small_says_so_with_the_numbers() -> None:
    shape = model()  # 8.5 GiB of weights: about 9.60 GiB
    got = refused(place(shape, [me(4 * GIB)], local_id=ME))
    assert got.reason == "model_too_large" and REASONS[got.reason].exit == Exit.CANNOT_RUN
    assert got.message == (
        "this model needs about 9.60 GiB; this node has 4.00 GiB for a runner (free memory less "
        "EXOD_RESERVED_MEMORY, at most EXOD_MAX_RUNNER_MEMORY) and no other member is reachable: "
        "free memory, add a member to split it over (`exoctl cluster invite`), or use a smaller "
        "or quantized model"
    )


def test_one_node_and_an_architecture_that_cannot_split_does_not_suggest_a_member() -> None:
    got = refused(place(model(pipeline=False), [me(4 * GIB)], local_id=ME))
    assert "add a member" not in got.message
    assert got.message.endswith("free memory, or use a smaller or quantized model")


def test_too_little_in_total_names_needed_sum_and_largest() -> None:
    shape = model()
    members = [me(3 * GIB), peer(B, 2 * GIB, has_model=True), peer(C, 40 * GIB, state="removed")]
    got = refused(place(shape, members, local_id=ME))
    assert got.reason == "model_too_large"
    assert got.message == (
        "this model needs about 9.60 GiB on one node, or 8.80 GiB of layers plus 819 MiB on "
        "every rank to split it; the 2 reachable members have 5.00 GiB for runners in all, at "
        f"most 3.00 GiB on one ({ME}): free memory, add a member, or use a smaller or "
        "quantized model"
    )


def test_an_architecture_that_cannot_be_split() -> None:
    shape = Shape("llama", (GIB,) * 8, GIB // 2, pipeline=False)
    members = [me(5 * GIB), peer(B, 6 * GIB)]  # together they would hold it
    got = refused(place(shape, members, local_id=ME))
    assert got.reason == "model_too_large"
    assert got.message == (
        f"this model needs about 9.60 GiB, more than any member has for a runner (at most "
        f"6.00 GiB, on {B}), and mlx-lm has no pipeline for llama, so it cannot be split over "
        "members: free memory on one member, or use a smaller or quantized model"
    )


def test_one_layer_cannot_be_split() -> None:
    shape = model(layers=1, layer=8 * GIB)
    got = refused(place(shape, [me(5 * GIB), peer(B, 6 * GIB)], local_id=ME))
    assert "cannot be split over members" in got.message


# --- forced (--on) ------------------------------------------------------------------------------


def test_forced_on_one_member_holds_it_whole_there() -> None:
    shape = model()
    members = [me(100 * GIB), peer(B, 20 * GIB), peer(C, 30 * GIB)]
    assert place(shape, members, local_id=ME, forced=[B]) == whole(shape, B)


def test_forced_on_one_member_too_small() -> None:
    shape = model()
    members = [me(100 * GIB), peer(B, 2 * GIB)]
    got = refused(place(shape, members, local_id=ME, forced=[B]))
    assert got.reason == "model_too_large"
    assert got.message.startswith(f"this model needs about 9.60 GiB; {B} has 2.00 GiB for a runner")
    # Loaded there already: it fits where it is.
    assert place(shape, members, local_id=ME, forced=[B], loaded_on=[B]) == whole(
        shape, B, loaded=True
    )


def test_forced_split_goes_in_the_order_given_even_where_it_would_fit_whole() -> None:
    shape = model(layers=8)
    members = [me(100 * GIB), peer(B, room_for(6 * GIB, shape)), peer(C, room_for(2 * GIB, shape))]
    plan = place(shape, members, local_id=ME, forced=[C, B])
    assert plan == split(shape, (C, 6, 7), (B, 0, 5))


def test_forced_split_that_does_not_fit_names_the_rank() -> None:
    shape = model(layers=8)
    members = [me(room_for(GIB, shape)), peer(B, room_for(2 * GIB, shape))]
    got = refused(place(shape, members, local_id=ME, forced=[ME, B]))
    assert got.reason == "model_too_large"
    assert got.message.startswith(f"split over {ME}, {B}, rank ")
    assert "leave out --on" in got.message


def test_forced_more_members_than_layers() -> None:
    shape = model(layers=2)
    members = [me(10 * GIB), peer(B, 10 * GIB), peer(C, 10 * GIB)]
    got = refused(place(shape, members, local_id=ME, forced=[ME, B, C]))
    assert got == Refused(
        "model_too_large", "--on names 3 members but this model has 2 layers: name at most 2"
    )


def test_forced_split_of_an_architecture_that_cannot_be_split() -> None:
    shape = Shape("llama", (GIB,) * 8, GIB, pipeline=False)
    got = refused(place(shape, [me(10 * GIB), peer(B, 10 * GIB)], local_id=ME, forced=[ME, B]))
    assert got == Refused(
        "model_too_large",
        "mlx-lm has no pipeline for llama, so this model cannot be split over members: name one "
        "member with --on",
    )


@pytest.mark.parametrize(
    ("state", "reason", "exit_"),
    [
        ("unreachable", "peer_unreachable", Exit.TEMPFAIL),
        ("removed", "node_not_found", Exit.NOT_FOUND),
        ("refused", "node_not_found", Exit.NOT_FOUND),
    ],
)
def test_forced_on_a_member_that_is_not_alive(state: str, reason: str, exit_: Exit) -> None:
    members = [me(100 * GIB), peer(B, 100 * GIB, state=state)]
    got = refused(place(model(), members, local_id=ME, forced=[ME, B]))
    assert got.reason == reason and REASONS[reason].exit == exit_
    assert B in got.message and "--on" in got.message


def test_forced_on_an_unknown_node() -> None:
    got = refused(place(model(), [me(100 * GIB)], local_id=ME, forced=["n-ffffffffffff"]))
    assert got == Refused(
        "node_not_found",
        "n-ffffffffffff is not a member of this cluster: see the nodes in `exoctl status`",
    )


def test_forced_twice_the_same_node() -> None:
    got = refused(place(model(), [me(100 * GIB), peer(B, 1)], local_id=ME, forced=[B, ME, B]))
    assert got == Refused("invalid_argument", f"--on names {B} twice: name each once")
