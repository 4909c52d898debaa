"""What a pipeline node measures of itself before it trains (its compute speed, its links
to the peers: the scheduler's inputs, announced in the DHT) and pipeline.auto_assign's
placement of every node on a stage."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from loco.protocols.membership import Membership
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import ASSIGN
from loco.protocols.pipeline.probe import LinkProber
from loco.protocols.pipeline.schedule import assign_stages

from ..config import Config, ConfigError
from ..lm_output import ModelOutputError, vocab_size_of
from ..stages import model_parts
from .compute import Activations
from .planning import Planner
from .post import Post
from .standing import Standing

log = logging.getLogger("loco.node.pipeline")


@dataclass(frozen=True)
class ModelFacts:
    """What every node knows of the model before it holds a stage: the hidden states between
    stages, the number of blocks, the vocabulary, and its first block (timed by
    ``block_seconds`` for the schedule's w)."""

    activations: Activations
    n_blocks: int
    vocab_size: int
    first_block: torch.nn.Module


def describe_model(cfg: Config) -> ModelFacts:
    """Build the model (built-in or model.factory's; ConfigError if it does not declare its
    stages, or has fewer blocks than the pipeline has stages)."""
    torch.manual_seed(cfg.train.seed)
    model, parts = model_parts(cfg.model, cfg.pipeline.split)
    try:
        vocab = vocab_size_of(model)
    except ModelOutputError as exc:
        raise ConfigError(f"model: {exc}") from None
    with torch.no_grad():
        width = int(parts.embed(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
    activations = Activations.of(cfg, width)
    if cfg.pipeline.stages > len(parts.blocks):
        raise ConfigError(f"pipeline.stages ({cfg.pipeline.stages}) exceeds the model's {len(parts.blocks)} blocks: "
                          f"every stage needs at least one")
    return ModelFacts(activations, len(parts.blocks), vocab, parts.blocks[0])


def block_seconds(facts: ModelFacts, device: torch.device) -> float:
    """Seconds of one forward pass of the model's first block on one microbatch: the
    fastest of eight timed forward + backward passes after a warm-up, over 2.5. Other work on
    the machine only ever slows a pass down, so the fastest says the most about the node
    (the median of three read identical processes of one busy machine as 25 to 115 ms)."""
    block = facts.first_block.to(device)
    x = torch.randn(*facts.activations.shape, device=device, requires_grad=True)
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        block(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times[1:]) / 2.5  # forward + backward (1.5x)


def measure_links(activations: Activations, prober: LinkProber, membership: Membership, standing: Standing) -> None:
    """Latency and bandwidth to every peer the DHT shows, with activation-sized probes;
    announced with this node's record."""
    peers = {p.id: p.endpoint for p in membership.peers()}
    t0 = time.monotonic()
    measured = prober.measure(peers, activations.bytes)
    standing.links = {peer: [lat, bw] for peer, (lat, bw) in measured.items()}
    log.info("measured the links to %d of %d peers in %.1fs", len(measured), len(peers), time.monotonic() - t0)
    membership.announce(standing.peer_info())


def assign_stage(cfg: Config, standing: Standing, planner: Planner, membership: Membership, channel: Channel,
                 post: Post, stop: threading.Event) -> None:
    """pipeline.auto_assign: the smallest id places every node on a stage from the
    measured speeds and links (keeping each stage's replica count) and tells the rest;
    a node that starts into a running pipeline takes the stage with the fewest replicas."""
    p = cfg.pipeline
    if not planner.fresh_swarm():  # too late for the placement: fill the thinnest stage
        have = Counter(q.stage for q in membership.peers() if q.round >= 0)
        standing.stage = min(range(p.stages), key=lambda s: (have[s], s))
        log.info("joining a running pipeline: stage %d has the fewest live replicas", standing.stage)
        return
    deadline = time.monotonic() + cfg.swarm.join_timeout_s
    sent = False  # (once: a second placement from a roster that changed meanwhile could differ)
    while time.monotonic() < deadline and not stop.is_set():
        roster = [] if sent else planner.whole_roster() or []  # (a partial view could make two nodes place)
        measured = bool(roster) and all(q.links and q.throughput > 0 for q in roster)
        if measured and min(q.id for q in roster) == standing.id:
            placed = assign_stages(planner.setting(roster), seed=cfg.train.seed)
            post.broadcast(ASSIGN, 0, {"stages": {n.id: n.stage for n in placed.nodes}}, roster)
            sent = True
        while (msg := channel.next_filed(ASSIGN)) is not None:
            stages = msg.meta.get("stages")
            valid = isinstance(stages, dict) and all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s < p.stages for s in stages.values())
            if not valid or standing.id not in stages:
                post.reject(msg, f"no valid stage for {standing.id} in {str(stages)[:80]}")
                continue
            planner.placement = dict(stages)  # iteration 0 is planned with it (records may lag)
            standing.stage = stages[standing.id]
            log.info("placed on stage %d", standing.stage)
            return
        channel.pull(0, timeout=1.0)
    raise ConnectionError("pipeline.auto_assign: no placement arrived")
