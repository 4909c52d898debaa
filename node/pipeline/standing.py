"""Where a pipeline node stands, shared by its parts and announced in the DHT: its stage,
the iteration it is at, whether a plan counts it a member (or it is joining, or joining
again after its hand-off source left), and what it measured of itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.plan import JOINING, REJOINING, STARTING


@dataclass
class Standing:
    id: str
    stage: int
    endpoint: str = ""
    it: int = 0
    member: bool = False
    rejoining: bool = False  # its hand-off source left before sending: it asks to be admitted again
    ready: bool = False  # it waits for a plan (before: STARTING, not admitted to a running pipeline)
    layer_s: float = 0.0  # seconds of one block's forward pass on one microbatch
    links: dict[str, list[float]] = field(default_factory=dict)  # peer -> [latency s, bandwidth B/s]

    def peer_info(self) -> PeerInfo:
        """This node's DHT record: its iteration as a member, else REJOINING, JOINING or
        STARTING."""
        if self.member:
            round = self.it
        else:
            round = REJOINING if self.rejoining else JOINING if self.ready else STARTING
        return PeerInfo(self.id, self.endpoint, round, self.stage, 1.0 / self.layer_s if self.layer_s else 0.0,
                        left=False, links=self.links)
