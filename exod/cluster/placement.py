"""Where a model runs in a cluster, as a pure function of the model's shape and the members.

Order of preference (docs/cluster.md, "Placement"):
1. a member where the model is loaded already (this node first);
2. this node, the one that got the request, when the whole model fits here;
3. the one member with room for the whole model (one that holds its files first, then the most
   free memory);
4. its layers split over the members, in proportion to the room each has for layers (its room
   less what every rank keeps), at least one layer each, largest remainder; ranks in mlx-lm's
   order: rank 0 holds the last layers, the last rank the first ones. This node is rank 0 when
   it takes part (it streams rank 0's tokens to the client).
Otherwise a refusal that says why, with the numbers.

A member's room is what one runner may take there: its free memory as it last reported it, less
its EXOD_RESERVED_MEMORY, at most its EXOD_MAX_RUNNER_MEMORY. A rank needs what the single-node
admission estimates for its weights (its layers and the shared tensors): admission.estimate.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from fractions import Fraction

from exod.models.shape import Shape
from exod.runners.admission import RUNTIME_OVERHEAD, WEIGHT_FACTOR, estimate

# Members that placement may use: this node, and those heard from within EXOD_PEER_TIMEOUT.
USABLE = frozenset({"self", "alive"})


@dataclass(frozen=True)
class Member:
    id: str
    room: int  # what one runner may take there (usable_memory of what it reported)
    state: str = "alive"  # as `exoctl status` lists it: self, alive, unreachable, refused, removed
    has_model: bool = False  # it holds the model's files already
    name: str = ""


@dataclass(frozen=True)
class Rank:
    rank: int
    node: str
    first_layer: int
    last_layer: int
    bytes: int  # what its runner needs: estimate(its layers + the shared tensors)


@dataclass(frozen=True)
class Refused:
    reason: str  # from exod/errors.py REASONS: how exoctl exits
    message: str


@dataclass(frozen=True)
class Plan:
    whole_on: str | None = None
    ranks: tuple[Rank, ...] = ()  # what each node holds; one rank (every layer) when whole
    refused: Refused | None = None
    # whole_on runs the model already (a runner there): runs go to that runner.
    loaded: bool = False
    # The model's content hash (models/inspect.py), as planning.py read it for this plan.
    content_hash: str = ""


def usable_memory(free: int, reserved: int, cap: int) -> int:
    """What one runner may take on a member that reports `free` bytes, keeps `reserved` from
    its runners and caps each at `cap` (0: no cap known)."""
    room = max(free - reserved, 0)
    return min(room, cap) if cap > 0 else room


def place(
    shape: Shape,
    members: Sequence[Member],
    *,
    local_id: str,
    loaded_on: Collection[str] = (),
    forced: Sequence[str] | None = None,
) -> Plan:
    """The plan for `shape` over `members` (this node, `local_id`, among them)."""
    if forced:
        return _forced(shape, members, list(forced), loaded_on)
    usable = sorted(
        (m for m in members if m.state in USABLE), key=lambda m: (m.id != local_id, m.id)
    )
    whole = _whole_choice(shape, usable, local_id, loaded_on)
    if whole is not None:
        return _whole(shape, whole, loaded_on)
    if len(usable) < 2:
        return _refuse(_too_large_for(shape, usable, local_id))
    if not shape.pipeline or shape.layers < 2:
        return _refuse(_unsplittable(shape, usable))
    return _auto_split(shape, usable, local_id)


def _whole_choice(
    shape: Shape, usable: Sequence[Member], local_id: str, loaded_on: Collection[str]
) -> Member | None:
    """The member to hold the whole model: one where it is loaded already (this node first);
    else this node if it fits; else the one that fits that holds the files, the most room."""
    for m in usable:
        if m.id in loaded_on:
            return m
    need = estimate(shape.total_bytes)
    fits = [m for m in usable if need <= m.room]
    if not fits:
        return None
    return min(fits, key=lambda m: (m.id != local_id, not m.has_model, -m.room))


def _auto_split(shape: Shape, usable: Sequence[Member], local_id: str) -> Plan:
    """Over every member that can hold a layer, the most room first, at most one per layer;
    else without the smallest ones (which may not hold even the one layer each must take)."""
    candidates = sorted(
        (m for m in usable if _layer_room(shape, m) > 0), key=lambda m: (-m.room, m.id)
    )[: shape.layers]
    for count in range(len(candidates), 1, -1):
        # This node is rank 0 when it takes part; the others in the order of their room.
        ordered = sorted(candidates[:count], key=lambda m: m.id != local_id)
        ranks = _split(shape, ordered)
        if all(r.bytes <= m.room for r, m in zip(ranks, ordered, strict=True)):
            return Plan(ranks=tuple(ranks))
    return _refuse(_cluster_too_small(shape, usable))


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """`total` items over len(weights) takers in proportion to the weights, at least one each,
    by largest remainder; ties go to the earlier taker. Needs 1 <= len(weights) <= total."""
    n = len(weights)
    if not 1 <= n <= total:
        raise ValueError(f"cannot give {total} items to {n} takers, at least one each")
    whole = sum(max(w, 0) for w in weights)
    quotas = [
        Fraction(total * max(w, 0), whole) if whole > 0 else Fraction(total, n) for w in weights
    ]
    counts = [max(1, int(q)) for q in quotas]
    # The minimum of one may have given out too many: take back from the furthest above quota.
    while sum(counts) > total:
        i = max((i for i in range(n) if counts[i] > 1), key=lambda i: (counts[i] - quotas[i], -i))
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(n), key=lambda i: (quotas[i] - counts[i], -i))
        counts[i] += 1
    return counts


def layout(shape: Shape, nodes: Sequence[str], counts: Sequence[int]) -> list[Rank]:
    """Ranks in mlx-lm's order: rank r holds the `counts[r]` layers after those of the ranks
    above it, so the last rank holds layer 0 and rank 0 the last layer."""
    ranks = []
    for r, (node, count) in enumerate(zip(nodes, counts, strict=True)):
        first = sum(counts[r + 1 :])
        last = first + count - 1
        need = estimate(shape.bytes_of(first, last) + shape.shared_bytes)
        ranks.append(Rank(r, node, first, last, need))
    return ranks


def _split(shape: Shape, members: Sequence[Member]) -> list[Rank]:
    """The split over `members` (in rank order): in proportion to their room for layers, then
    one layer at a time moved from a rank that overflows to the one with the most to spare
    (rounding may leave a rank a layer more than it holds)."""
    nodes = [m.id for m in members]
    counts = apportion(shape.layers, [_layer_room(shape, m) for m in members])
    for _ in range(shape.layers):
        ranks = layout(shape, nodes, counts)
        spare = [m.room - r.bytes for r, m in zip(ranks, members, strict=True)]
        over = min(range(len(spare)), key=lambda i: (spare[i], i))
        if spare[over] >= 0 or counts[over] == 1:
            return ranks
        taker = max((i for i in range(len(spare)) if i != over), key=lambda i: (spare[i], -i))
        counts[over] -= 1
        counts[taker] += 1
        moved = layout(shape, nodes, counts)
        if moved[taker].bytes > members[taker].room:
            return ranks  # nobody can take it: it does not fit
    return layout(shape, nodes, counts)


def _layer_room(shape: Shape, member: Member) -> int:
    """The layer bytes a member can hold beside what every rank keeps (estimate inverted)."""
    weights = int((member.room - RUNTIME_OVERHEAD) / WEIGHT_FACTOR)
    return weights - shape.shared_bytes


def _whole(shape: Shape, member: Member, loaded_on: Collection[str]) -> Plan:
    rank = Rank(0, member.id, 0, max(shape.layers - 1, 0), estimate(shape.total_bytes))
    return Plan(whole_on=member.id, ranks=(rank,), loaded=member.id in loaded_on)


def _refuse(refusal: Refused) -> Plan:
    return Plan(refused=refusal)


# --- forced (`--on`) ----------------------------------------------------------------------------


def _forced(
    shape: Shape, members: Sequence[Member], ids: list[str], loaded_on: Collection[str]
) -> Plan:
    """Exactly on `ids`: one = the whole model there; several = split over them, rank 0 on the
    first, in proportion to their room for layers."""
    chosen = _forced_members(members, ids)
    if isinstance(chosen, Refused):
        return _refuse(chosen)
    if len(chosen) == 1:
        (member,) = chosen
        need = estimate(shape.total_bytes)
        if member.id in loaded_on or need <= member.room:
            return _whole(shape, member, loaded_on)
        return _refuse(
            Refused(
                "model_too_large",
                f"this model needs about {_gib(need)}; {_who(member)} has {_gib(member.room)} for "
                "a runner (free memory less EXOD_RESERVED_MEMORY, at most EXOD_MAX_RUNNER_MEMORY): "
                "name another member, several to split it, or leave out --on",
            )
        )
    refusal = _forced_split_refusal(shape, len(chosen))
    if refusal is not None:
        return _refuse(refusal)
    ranks = _split(shape, chosen)
    for rank, member in zip(ranks, chosen, strict=True):
        if rank.bytes > member.room:
            return _refuse(
                Refused(
                    "model_too_large",
                    f"split over {', '.join(ids)}, rank {rank.rank} needs about "
                    f"{_gib(rank.bytes)} (layers {rank.first_layer}-{rank.last_layer} and what "
                    f"every rank keeps) but {_who(member)} has {_gib(member.room)} for a runner: "
                    "name members with more free memory, or leave out --on",
                )
            )
    return Plan(ranks=tuple(ranks))


def _forced_members(members: Sequence[Member], ids: list[str]) -> list[Member] | Refused:
    """The members `ids` names, in its order; a refusal for a repeated, unknown or unusable one."""
    by_id = {m.id: m for m in members}
    chosen = []
    for node in ids:
        member = by_id.get(node)
        if ids.count(node) > 1:
            return Refused("invalid_argument", f"--on names {node} twice: name each once")
        if member is None:
            return Refused(
                "node_not_found",
                f"{node} is not a member of this cluster: see the nodes in `exoctl status`",
            )
        if member.state not in USABLE:
            return _not_usable(member)
        chosen.append(member)
    return chosen


def _forced_split_refusal(shape: Shape, count: int) -> Refused | None:
    if not shape.pipeline:
        what = shape.model_type or "this architecture"
        return Refused(
            "model_too_large",
            f"mlx-lm has no pipeline for {what}, so this model cannot be split over members: "
            "name one member with --on",
        )
    if count > shape.layers:
        return Refused(
            "model_too_large",
            f"--on names {count} members but this model has {shape.layers} layers: name at "
            f"most {shape.layers}",
        )
    return None


def _not_usable(member: Member) -> Refused:
    if member.state == "unreachable":
        return Refused(
            "peer_unreachable",
            f"member {_who(member)} is unreachable (not heard from within EXOD_PEER_TIMEOUT): "
            "retry when it is back, or leave it out of --on",
        )
    return Refused(
        "node_not_found",
        f"{_who(member)} is {member.state}, not a member this node places on: leave it out of "
        "--on (see `exoctl status`)",
    )


# --- refusals -----------------------------------------------------------------------------------


def _too_large_for(shape: Shape, usable: Sequence[Member], local_id: str) -> Refused:
    need = estimate(shape.total_bytes)
    room = usable[0].room if usable else 0
    where = "this node" if not usable or usable[0].id == local_id else _who(usable[0])
    # More members help only a model that mlx-lm can split.
    more = "add a member to split it over (`exoctl cluster invite`), " if shape.pipeline else ""
    return Refused(
        "model_too_large",
        f"this model needs about {_gib(need)}; {where} has {_gib(room)} for a runner (free memory "
        "less EXOD_RESERVED_MEMORY, at most EXOD_MAX_RUNNER_MEMORY) and no other member is "
        f"reachable: free memory, {more}or use a smaller or quantized model",
    )


def _unsplittable(shape: Shape, usable: Sequence[Member]) -> Refused:
    need = estimate(shape.total_bytes)
    best = max(usable, key=lambda m: m.room)
    what = shape.model_type or "this architecture"
    return Refused(
        "model_too_large",
        f"this model needs about {_gib(need)}, more than any member has for a runner (at most "
        f"{_gib(best.room)}, on {_who(best)}), and mlx-lm has no pipeline for {what}, so it "
        "cannot be split over members: free memory on one member, or use a smaller or "
        "quantized model",
    )


def _cluster_too_small(shape: Shape, usable: Sequence[Member]) -> Refused:
    need = estimate(shape.total_bytes)
    every_rank = estimate(shape.shared_bytes)
    layers = int(sum(shape.layer_bytes) * WEIGHT_FACTOR)
    best = max(usable, key=lambda m: m.room)
    total = sum(m.room for m in usable)
    return Refused(
        "model_too_large",
        f"this model needs about {_gib(need)} on one node, or {_gib(layers)} of layers plus "
        f"{_gib(every_rank)} on every rank to split it; the {len(usable)} reachable members "
        f"have {_gib(total)} for runners in all, at most {_gib(best.room)} on one "
        f"({_who(best)}): free memory, add a member, or use a smaller or quantized model",
    )


def _who(member: Member) -> str:
    return f"{member.id} ({member.name})" if member.name else member.id


def _gib(n: int) -> str:
    """Sizes as the refusals of admission write them: MiB below a GiB."""
    return f"{n / (1 << 20):.0f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"
