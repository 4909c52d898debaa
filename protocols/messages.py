"""Every message kind loco sends, and the schema of its ``meta`` map, in one place.

The wire format (:mod:`.wire`) checks the header and the buffers; this module checks what
the header's ``meta`` holds, per kind, before any handler or mailbox sees the message. A
kind that is not listed here, a field of the wrong type (a bool where an int belongs, a
string where a float belongs), a non-finite float, or a field no sender of that kind
writes, and the transport drops the message and counts the reason. Code that reads
``msg.meta`` can therefore rely on the types declared here.

Nested maps that another layer validates (a codec's parameters, a served state's meta, a
pipeline plan) are declared as maps here and checked again, by value, where they are used.
"""

from __future__ import annotations

from typing import Annotated, Any, NotRequired

import pydantic
from pydantic import ConfigDict, TypeAdapter, with_config
from typing_extensions import TypedDict

# ------------------------------------------------------------------ kind names
JOIN, ROSTER, PART, AVG, DONE, DECISION = "JOIN", "ROSTER", "PART", "AVG", "DONE", "DECISION"
SKIP = "SKIP"  # header round: the first sync the sender runs (it adopted a state past the others)
ASK, PAST = "ASK", "PAST"  # a leader asks a member it waits for; the member answers if it is past that round
GOSSIP = "GOSSIP"
GOSSIP_PART = "GOSSIP_PART"  # a stretch of one rank's region of a NoLoCo round's vector (protocols/gossip_parts.py)
STATE, CO2_RESULT = "STATE", "CO2_RESULT"  # served snapshots; requests are f"{kind}_REQ"
STATE_PART = "STATE_PART"  # one rank's part of a state served in parts (a member of several ranks)
CO2_RESULT_PART = "CO2_RESULT_PART"  # one rank's part of a CO2 reduce's mean, served in parts likewise
PART_OF = {STATE: STATE_PART, CO2_RESULT: CO2_RESULT_PART}  # a thing served in parts: the kind of its parts
STATE_DIGEST = "STATE_DIGEST"  # a served snapshot's hash alone (a second peer vouching for a state)
PP_PLAN, PP_FWD, PP_BWD, PP_DROP = "PP_PLAN", "PP_FWD", "PP_BWD", "PP_DROP"
PP_FINAL, PP_ASSIGN, PP_STATE = "PP_FINAL", "PP_ASSIGN", "PP_STATE"
PP_PING, PP_PONG = "PP_PING", "PP_PONG"
RANK_VIEW = "RANK_VIEW"  # a member's leader to its own other ranks: the round members the DHT shows live

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

# the endpoints of a member's ranks, when it is several processes (protocols/regions.py)
RankEndpoints = Annotated[list[str], pydantic.Field(min_length=2, max_length=1024)]
# id, endpoint, weight[, rank endpoints]; msgpack has no tuples, so a strict tuple must accept a list
Member = (Annotated[tuple[str, str, pydantic.NonNegativeFloat], pydantic.Strict(False)] |
          Annotated[tuple[str, str, pydantic.NonNegativeFloat, RankEndpoints], pydantic.Strict(False)])


@with_config(_STRICT)
class Join(TypedDict):
    state_hash: str
    weight: pydantic.NonNegativeFloat
    endpoint: str
    ranks: NotRequired[RankEndpoints]


@with_config(_STRICT)
class Roster(TypedDict):
    status: str
    members: NotRequired[list[Member]]
    leader: NotRequired[str]  # status "redirect": the leader the sender follows this round
    endpoint: NotRequired[str]
    grouped: NotRequired[bool]  # status "redirect": that leader's roster has the sender


@with_config(_STRICT)
class Part(TypedDict):
    part: pydantic.NonNegativeInt
    offset: pydantic.NonNegativeInt
    codec: dict[str, Any]
    weight: NotRequired[pydantic.NonNegativeFloat]
    span: NotRequired[pydantic.PositiveInt]  # sync periods the contribution covers
    norm: NotRequired[pydantic.NonNegativeFloat]  # PART: the L2 norm of the sender's whole contribution


@with_config(_STRICT)
class Done(TypedDict):
    ok: bool
    missing: list[str]
    suspect: NotRequired[list[str]]


@with_config(_STRICT)
class Decision(TypedDict):
    decision: str
    status: NotRequired[str]
    members: NotRequired[list[Member]]


@with_config(_STRICT)
class Gossip(TypedDict):
    endpoint: NotRequired[str]
    group: NotRequired[list[str]]
    codec: NotRequired[dict[str, Any]]
    numel: NotRequired[pydantic.NonNegativeInt]
    decline: NotRequired[bool]
    weight: NotRequired[pydantic.NonNegativeFloat]  # a pipeline replica's microbatches in the mean it sends
    state: NotRequired[Annotated[str, pydantic.Field(max_length=128)]]  # the hash of its weights
    ranks: NotRequired[RankEndpoints]  # a handshake's sender is several processes: each rank's endpoint


@with_config(_STRICT)
class GossipPart(TypedDict):
    endpoint: str  # the sending rank's
    decline: NotRequired[bool]  # the receiver does not average with the sender this round
    lo: NotRequired[pydantic.NonNegativeInt]  # the stretch [lo, hi) of each section
    hi: NotRequired[pydantic.NonNegativeInt]
    numel: NotRequired[pydantic.NonNegativeInt]  # a section's length
    codecs: NotRequired[Annotated[list[dict[str, Any]], pydantic.Field(max_length=16)]]  # per section
    frames: NotRequired[Annotated[list[pydantic.NonNegativeInt], pydantic.Field(max_length=16)]]  # per section


@with_config(_STRICT)
class StateRequest(TypedDict):
    min_round: int
    endpoint: str


@with_config(_STRICT)
class StateReply(TypedDict):
    round: int
    hash: str
    meta: dict[str, Any]


@with_config(_STRICT)
class DigestRequest(TypedDict):
    round: int
    endpoint: str


@with_config(_STRICT)
class DigestReply(TypedDict):
    round: int
    hash: str  # "": this node published no snapshot of that round (or no longer remembers it)


@with_config(_STRICT)
class PipelineWork(TypedDict):
    mb: pydantic.NonNegativeInt
    hop: pydantic.NonNegativeInt
    eval: bool


@with_config(_STRICT)
class PipelineDrop(TypedDict):
    mb: pydantic.NonNegativeInt
    eval: bool
    why: str


@with_config(_STRICT)
class PipelinePlan(TypedDict):
    paths: list[list[str]]
    eval: list[list[str]]
    endpoints: dict[str, str]
    stages: dict[str, int]
    joins: NotRequired[dict[str, str]]
    last: NotRequired[bool]
    val_loss: NotRequired[float | None]


@with_config(ConfigDict(strict=True, extra="forbid"))  # a diverged validation loss is news, not poison
class PipelineFinal(TypedDict):
    val_loss: float | None


@with_config(_STRICT)
class PipelineAssign(TypedDict):
    stages: dict[str, int]


@with_config(_STRICT)
class PipelineState(TypedDict):
    stage: int
    adam_step: int
    outer_steps: int


@with_config(_STRICT)
class Ping(TypedDict):
    reply_to: str


@with_config(_STRICT)
class Empty(TypedDict):
    pass


@with_config(_STRICT)
class Ask(TypedDict):
    endpoint: str


# (id, session) of a live member; msgpack has no tuples
LiveMember = Annotated[tuple[Annotated[str, pydantic.Field(max_length=256)],
                             Annotated[str, pydantic.Field(max_length=128)]], pydantic.Strict(False)]


@with_config(_STRICT)
class RankView(TypedDict):
    live: Annotated[list[LiveMember], pydantic.Field(max_length=65_536)]


SCHEMAS: dict[str, type] = {
    JOIN: Join, ROSTER: Roster, PART: Part, AVG: Part, DONE: Done, DECISION: Decision, SKIP: Empty,
    ASK: Ask, PAST: Empty,
    GOSSIP: Gossip, GOSSIP_PART: GossipPart,
    STATE: StateReply, f"{STATE}_REQ": StateRequest,
    CO2_RESULT: StateReply, f"{CO2_RESULT}_REQ": StateRequest,
    STATE_PART: StateReply, f"{STATE_PART}_REQ": StateRequest,
    CO2_RESULT_PART: StateReply, f"{CO2_RESULT_PART}_REQ": StateRequest,
    STATE_DIGEST: DigestReply, f"{STATE_DIGEST}_REQ": DigestRequest,
    PP_PLAN: PipelinePlan, PP_FWD: PipelineWork, PP_BWD: PipelineWork, PP_DROP: PipelineDrop,
    PP_FINAL: PipelineFinal, PP_ASSIGN: PipelineAssign, PP_STATE: PipelineState,
    PP_PING: Ping, PP_PONG: Empty,
    RANK_VIEW: RankView,
}


class MetaError(ValueError):
    """A message whose kind is unknown or whose meta does not fit its kind's schema."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # the counter it is dropped under: "UnknownKind" | "BadMeta"


class MetaValidator:
    """Checks ``meta`` against the schema of its kind (compiled once per kind)."""

    def __init__(self, schemas: dict[str, type] | None = None):
        self._adapters = {kind: TypeAdapter(schema) for kind, schema in (schemas or SCHEMAS).items()}

    def check(self, kind: str, meta: dict[str, Any]) -> None:
        adapter = self._adapters.get(kind)
        if adapter is None:
            raise MetaError("UnknownKind", f"unknown message kind {kind[:64]!r}")
        try:
            adapter.validate_python(meta)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "meta"
            raise MetaError("BadMeta", f"{kind} meta field {where}: {first['msg']}") from None
