"""Typed, validated configuration: one model per component, TOML files, dotted overrides.

Every field has a docstring (shown by ``loco config``-style docs in the README); unknown
keys and wrong types are rejected with a message that names the key. Runtime objects
(sockets, models) never live here.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .bandwidth import parse_bandwidth
from .config_layers import env_overrides, suggest


class ConfigError(ValueError):
    """A config file, override or field that cannot be used; the message names it."""


class _Section(BaseModel):
    # the docstring under each field is its description (the README's table is made from them)
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, use_attribute_docstrings=True)


class NodeConfig(_Section):
    id: str | None = None
    """Node id; unique in the swarm (the smallest id of a round leads it). Default: derived
    from host name and output folder, so a restart with the same --out resumes the same node."""
    listen_host: str = "127.0.0.1"
    """Address the ZeroMQ and DHT sockets bind to (0.0.0.0 for all interfaces)."""
    announce_host: str | None = None
    """Address other nodes should use to reach this one (default: listen_host; required
    with listen_host 0.0.0.0)."""
    port: int = Field(0, ge=0, le=65535)
    """ZeroMQ data port; 0 lets the OS choose."""
    dht_port: int = Field(0, ge=0, le=65535)
    """hivemind DHT port; 0 lets the OS choose."""
    device: str = "cpu"
    """Torch device for training: auto (a GPU when there is one, else the CPU), cpu, cuda
    (the first GPU) or cuda:N. ``loco swarm``/``loco run`` give each node its own GPU when
    this is auto or cuda (see swarm.nodes_per_gpu)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve live Prometheus metrics at http://listen_host:PORT/metrics (README, Metrics); 0:
    the OS chooses (the URL is in OUT/nodes/<node>.json); None: off. ``loco swarm`` and
    ``loco run`` give node i the port PORT + i."""
    threads: int = Field(0, ge=0)
    """Torch intra-op threads (of each process); 0 keeps torch's default (``loco swarm``
    divides the machine's cores among its nodes)."""
    nproc_per_node: int = Field(1, ge=1, le=64)
    """Processes of this node (one per GPU on a GPU node). With more than one the node is one
    swarm member made of several torch.distributed ranks that train together the way
    node.parallel says (NCCL between GPUs, gloo on the CPU); rank 0 talks to the swarm. With
    device cuda:N the ranks use GPUs N, N+1, ... `loco node start --nproc-per-node` sets it;
    under torchrun it is the number of processes torchrun starts."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How the ranks of a node of several processes train together, each on its own
    batches: ddp (DistributedDataParallel: every rank holds the whole model, the gradients
    are averaged every step) or fsdp (FSDP2's fully_shard: each rank holds a shard of every
    block and of its AdamW state; with diloco, streaming_diloco, co2 or
    noloco and rank_exchange parallel every rank keeps the outer state of its own region of
    the weights, else rank 0 gathers the whole weights in host memory for the outer step;
    with ddp across nodes every rank averages its own region of every step's gradients with
    the other nodes and keeps its region of the weights and AdamW moments the nodes
    synchronize: rank_exchange parallel, float32 parameters)."""
    rank_exchange: Literal["parallel", "leader"] = "parallel"
    """How a node of several processes sends what it averages with the swarm (DiLoCo's
    pseudo-gradient, DDP's gradients, Streaming DiLoCo's fragments, CO2's background reduce):
    parallel (every rank sends and averages its own region of it through its own endpoint,
    with the ranks of other nodes that hold the same stretch; nodes of any process counts
    match) or leader (rank 0 sends it all). NoLoCo's gossip leaves from every rank with
    parallel fsdp (each rank its region of the outer state), else from rank 0; L-GreCo always
    sends from rank 0."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device {v!r}: expected auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _listen_all_needs_announce(self) -> NodeConfig:
        if self.listen_host in ("0.0.0.0", "::") and not self.announce_host:
            raise ValueError("listen_host is a wildcard; set node.announce_host to a reachable address")
        return self


class SwarmConfig(_Section):
    run_id: str = "loco"
    """Name of the training run; nodes with different run ids ignore each other."""
    initial_peers: list[str] = []
    """Multiaddresses of any live node of the swarm to join (empty: start a new swarm)."""
    key: str | None = None
    """Shared secret: every message and DHT record is signed with it, others are dropped.
    Env: LOCO_SWARM_KEY. None: a node that starts a new swarm makes one (kept under --out)
    and prints a join token; ``loco swarm``/``loco run`` make one for their nodes."""
    insecure: bool = False
    """Run without a key: anyone who reaches a node's ports can read the model, change it
    and impersonate peers. Must be asked for; every node logs a warning."""
    announce_ttl_s: float = Field(8.0, gt=0)
    """Seconds a membership record lives without refresh (a dead node vanishes after this)."""
    join_timeout_s: float = Field(120.0, gt=0)
    """How long a joining node waits to see the swarm and fetch its state."""
    bootstrap_timeout_s: float = Field(60.0, ge=0)
    """How long a starting node keeps trying to reach its initial peers' DHT (a busy peer
    can refuse a restarting node's first attempts); 0: one attempt. A node restarted with no
    peers given tries the ones it saw last time for at most 15 s, then starts anew."""
    wait_for_peers: int = Field(0, ge=0)
    """Before training, wait (up to join_timeout_s) until this many other peers are visible."""
    nodes_per_gpu: int = Field(1, ge=1)
    """``loco swarm``/``loco run`` on a GPU machine: nodes sharing one GPU (node i gets
    cuda:(i // nodes_per_gpu) mod GPUs)."""


# Built-in GPT shapes a user can ask for by name; explicit model.* keys override them.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # 0.45M parameters (byte vocabulary): tests, demos, a laptop
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128},
    # 10.8M parameters with the byte vocabulary (nanoGPT's character-level shape)
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    # GPT-2 small: 124M parameters with GPT-2's vocabulary of 50257
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50257},
}

# Keys only the built-in GPT reads: set beside model.factory they would be ignored.
_BUILTIN_ONLY = ("preset", "n_layer", "n_head", "n_embd", "dropout", "vocab_size")


class ModelConfig(_Section):
    factory: str | None = None
    """'module:callable' called with ``kwargs``, returning an nn.Module (see README, Models:
    what it may return); None: the built-in GPT."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments for ``factory`` (TOML table ``[model.kwargs]``)."""
    computes_loss: bool = False
    """The model computes its own loss: the trainer calls ``model(idx, labels=idx)`` and
    takes the loss it returns (it shifts the labels itself, as HuggingFace causal LMs do)."""
    preset: Literal["tiny", "small", "gpt2-124m"] | None = None
    """Built-in GPT shape by name (README, Models); model.* keys set beside it win."""
    vocab_size: int = Field(256, ge=2)
    """Vocabulary of the built-in GPT (256: bytes). A factory's model brings its own."""
    n_layer: int = Field(2, ge=1)
    """Transformer blocks of the built-in GPT."""
    n_head: int = Field(4, ge=1)
    """Attention heads per block."""
    n_embd: int = Field(128, ge=8)
    """Embedding width."""
    block_size: int = Field(128, ge=8)
    """Context length in tokens. A factory's model with its own ``block_size`` attribute sets it; this key, if not the default, must agree."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability."""

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            return {**MODEL_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @model_validator(mode="after")
    def _factory_keys(self) -> ModelConfig:
        if not self.factory:
            if self.kwargs:
                raise ValueError("model.kwargs are passed to model.factory, which is unset")
            if self.computes_loss:
                raise ValueError("model.computes_loss needs model.factory (the built-in GPT returns logits)")
            return self
        ignored = [k for k in _BUILTIN_ONLY if getattr(self, k) != type(self).model_fields[k].default]
        if ignored:
            raise ValueError(f"{', '.join('model.' + k for k in ignored)} shape(s) the built-in GPT; "
                             f"with model.factory set, pass them in model.kwargs")
        return self


class DataConfig(_Section):
    path: str | None = None
    """Text file, folder of text files (read as bytes), a token file (.bin, .npy:
    memory-mapped), or a HuggingFace datasets folder (README, Data); None: the Python
    standard library's source."""
    token_dtype: Literal["uint16", "uint32"] | None = None
    """Id width of a .bin token file (uint16 or uint32); None: its sidecar's dtype, else
    uint16. An error for any other data.path."""
    text_column: str = "text"
    """A HuggingFace datasets folder without an ``input_ids`` column: the column of text.
    An error for any other data.path."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of files (by path hash) held out for validation."""
    max_bytes: int = Field(8_000_000, gt=0)
    """Upper bound on text corpus (and datasets folder) bytes read (keeps start-up fast);
    token files are memory-mapped whole, and setting it beside one is an error."""
    batch_size: int = Field(16, ge=1)
    """Sequences per inner step."""
    val_batches: int = Field(4, ge=1)
    """Batches in each validation pass (the same for every node)."""


class NoLoCoConfig(_Section):
    """NoLoCo (docs/ALGORITHMS.md section 3): gossip averaging in small random groups."""

    alpha: float = Field(0.5, ge=0, lt=1)
    """α: outer momentum of δ."""
    beta: float = Field(0.7, gt=0)
    """β: weight of the group's mean local progress d̄ = mean(θ − φ)."""
    gamma: float = Field(0.7, ge=0)
    """γ: pull of each replica's φ towards the group's mean φ̄ (keeps replicas together)."""
    group_size: int = Field(2, ge=2)
    """g: replicas per averaging group (2: one partner). An odd node out joins a group."""
    exchange_timeout_s: float = Field(30.0, gt=0)
    """How long to wait for partners' data; after it the node takes a local-only step. It
    must cover sending 2x the model, encoded, over the slowest uplink, plus the answers owed
    to peers that adopted this node: raise it for large models on slow links
    (docs/BENCHMARKS.md, simulated swarms)."""


class CO2Config(_Section):
    """CO2 (docs/ALGORITHMS.md section 4): the all-reduce of round t runs during round t+1."""

    outer_lr: float = Field(0.5, gt=0)
    """η: outer learning rate (the paper's 1.0 trailed 0.5 by 10% in loss on the algorithms
    table: the one-round-stale average applied at full size overshoots; docs/BENCHMARKS.md)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """β: outer momentum (paper: 0 up to 16 workers, 0.2 to 32, 0.5 to 64, 0.6 beyond; at 4
    workers every β > 0 tried raised the loss)."""
    clip: float = Field(1.0, ge=0)
    """c: element-wise clamp of the outer momentum to [-c, c]; 0 disables."""
    staleness: Literal["fixed", "gap_aware"] = "fixed"
    """Staleness gap penalty λ: 'fixed' divides by ``penalty``; 'gap_aware' by
    max(1, ‖gap‖ / mean‖g‖) per tensor (see optim/co2.py; the paper's formula is unverified)."""
    penalty: float = Field(1.0, ge=1)
    """λ for staleness='fixed' (1: no penalty)."""


class StreamingConfig(_Section):
    """Streaming DiLoCo (docs/ALGORITHMS.md section 2): fragments on staggered schedules."""

    fragments: int = Field(2, ge=1)
    """P: fragments, strided over the transformer blocks."""
    overlap: int = Field(1, ge=0)
    """τ: inner steps that run while a fragment's average is in flight (0: blocking)."""
    mix: float = Field(0.5, ge=0, le=1)
    """α: after overlap, θ_p ← α·θ_p(local) + (1−α)·θ̃_p (ignored when overlap = 0)."""


class OptimConfig(_Section):
    algorithm: Literal["diloco", "streaming_diloco", "noloco", "co2", "ddp"] = "diloco"
    """diloco: local steps + outer all-reduce; streaming_diloco: the same, fragment by
    fragment, overlapped; noloco: gossip with random partners, no collective; co2: the
    all-reduce hidden behind the next round; ddp: gradients averaged every step (baseline)."""
    inner_steps: int = Field(30, ge=1)
    """H: inner steps per outer round (ddp: steps between evaluations/records)."""
    inner_lr: float = Field(1e-3, gt=0)
    """Inner AdamW learning rate (paper: 4e-4 at 150M+ parameters; small models like more)."""
    weight_decay: float = Field(0.1, ge=0)
    """Inner AdamW weight decay (the NoLoCo paper uses 0)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Inner AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip for inner steps; 0 disables. With ddp the norm is a float64 sum
    of squares rounded to 16 significant bits, the same bits whether a node shards the
    model or not (the nodes' weights stay identical)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up of the inner learning rate."""
    outer_lr: float = Field(0.7, gt=0)
    """η: outer learning rate (diloco, streaming_diloco)."""
    outer_momentum: float = Field(0.9, ge=0, lt=1)
    """μ: outer momentum (diloco, streaming_diloco)."""
    nesterov: bool = True
    """Nesterov outer momentum (diloco, streaming_diloco)."""
    outer_state_device: Literal["auto", "cpu"] = "auto"
    """Where DiLoCo's anchor and outer momentum live: auto = beside the parameters; cpu =
    in (pinned) host memory, saving 2 model copies of GPU memory (as INTELLECT-1 did)."""
    noloco: NoLoCoConfig = NoLoCoConfig()
    co2: CO2Config = CO2Config()
    streaming: StreamingConfig = StreamingConfig()

    @model_validator(mode="after")
    def _outer_state_device(self) -> OptimConfig:
        if self.outer_state_device == "cpu" and self.algorithm != "diloco":
            raise ValueError(f"outer_state_device = 'cpu' is implemented for diloco, not {self.algorithm!r}")
        return self

    @model_validator(mode="after")
    def _streaming_schedule_fits(self) -> OptimConfig:
        if self.algorithm != "streaming_diloco":
            return self
        p, tau, h = self.streaming.fragments, self.streaming.overlap, self.inner_steps
        if p > h:
            raise ValueError(f"streaming.fragments ({p}) must not exceed inner_steps ({h})")
        if tau >= max(1, h // p):
            raise ValueError(f"streaming.overlap ({tau}) must be below inner_steps / fragments "
                             f"({h} // {p} = {h // p}): one fragment in flight at a time")
        return self


class CollectiveConfig(_Section):
    matchmaking_timeout_s: float = Field(30.0, gt=0)
    """Leader: how long to wait for peers to join a round."""
    join_timeout_s: float = Field(60.0, gt=0)
    """Follower: how long to wait for the leader's roster."""
    allreduce_timeout_s: float = Field(60.0, gt=0)
    """Deadline for the reduce-scatter + all-gather of one attempt."""
    decision_timeout_s: float = Field(30.0, gt=0)
    """Leader: how long to wait for members' DONE reports."""
    max_attempts: int = Field(3, ge=1)
    """Attempts (with the survivors) before a round is skipped."""
    max_norm_ratio: float = Field(10.0, ge=0)
    """A contribution whose norm exceeds this many times the group's median (NoLoCo: the
    partners') is left out of the average and its sender reported as a suspect; 0: off.
    Non-finite contributions are always left out."""


class LGrecoConfig(_Section):
    """L-GreCo (docs/ALGORITHMS.md section 6): per-layer levels, re-planned every few rounds."""

    enabled: bool = False
    """Plan per-layer levels (diloco and co2; the codec must have levels: int*, topk, powersgd)."""
    every_rounds: int = Field(5, ge=1)
    """K: outer rounds between plans."""
    warmup_rounds: int = Field(2, ge=0)
    """Rounds at the uniform level before the first plan."""
    bins: int = Field(1000, ge=10)
    """Steps of the discretized error axis of the dynamic program."""


class CompressionConfig(_Section):
    codec: Literal["none", "fp16", "bf16", "int8", "int4", "int2", "topk", "powersgd"] = "none"
    """Codec for everything the algorithm sends (all-reduce parts both ways, gossip)."""
    error_feedback: bool = True
    """Keep what a lossy codec dropped and add it before the next encoding."""
    block_size: int = Field(256, ge=1)
    """int8/int4/int2: elements per float32 scale."""
    density: float = Field(0.01, gt=0, le=1)
    """topk: share of entries kept per piece."""
    rank: int = Field(4, ge=1)
    """powersgd: rank of the approximation."""
    lgreco: LGrecoConfig = LGrecoConfig()

    @model_validator(mode="after")
    def _lgreco_needs_levels(self) -> CompressionConfig:
        if self.lgreco.enabled and self.codec in ("none", "fp16", "bf16"):
            raise ValueError(f"lgreco needs a codec with levels (int8, int4, int2, topk, powersgd), not {self.codec!r}")
        return self


class TrainConfig(_Section):
    rounds: int = Field(8, ge=0)
    """Outer rounds to train; 0: no round limit."""
    max_tokens: int = Field(0, ge=0)
    """Stop (at the end of the round) once this node has trained on this many tokens; 0: no limit."""
    max_time_s: float = Field(0.0, ge=0)
    """Stop (at the end of the round) after this many seconds of training; 0: no limit."""
    seed: int = 0
    """Seed of model init (shared by the swarm) and of each node's data stream."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Inner steps' forward/backward: fp32, or bf16 autocast (weights, synchronized state and
    outer optimizer stay fp32). bf16 needs a GPU that supports it (or the CPU)."""
    log_every: int = Field(10, ge=1)
    """Inner steps between loss records (each the mean of those steps' losses, summed on the
    device: the only host synchronization of the inner loop)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model for the inner steps: true, false, or "auto" (on a GPU, and
    eager if compiling fails; not on the CPU, where compiling costs more of a short run
    than it saves)."""
    checkpoint_every: int = Field(0, ge=0)
    """Outer rounds between checkpoints (in pipeline mode: iterations); 0: by time, every
    ``checkpoint_interval_s``. The final checkpoint (on stop) is always written."""
    checkpoint_interval_s: float = Field(600.0, gt=0)
    """With checkpoint_every = 0: a checkpoint at the end of the first round at least this
    long after the previous checkpoint (or the start)."""
    keep_checkpoints: int = Field(1, ge=0)
    """Previous checkpoints kept beside the current one (``<node>.safetensors.1``, ...)."""


class LinkConfig(_Section):
    bandwidth: str | None = None
    """e.g. '100mbit', '1gbit', '25MB/s' (the units tc reads: see README, Network emulation);
    None: unlimited."""
    latency_ms: float = Field(0.0, ge=0)
    """One-way latency added to every message."""
    jitter_ms: float = Field(0.0, ge=0)
    """Uniform jitter (±) on the latency; messages on a link are never reordered."""
    loss: float = Field(0.0, ge=0, lt=1)
    """Share of messages lost."""

    @field_validator("bandwidth")
    @classmethod
    def _valid_bandwidth(cls, v: str | None) -> str | None:
        if v is not None:
            parse_bandwidth(v)
        return v


class CutConfig(_Section):
    peer: str
    """Node id at the other end of the cut link."""
    start_s: float = Field(ge=0)
    """Seconds after network.epoch the link goes down."""
    end_s: float = Field(gt=0)
    """Seconds after network.epoch it comes back."""


class NetworkConfig(LinkConfig):
    """Emulated network for what this node sends: ``bandwidth`` is its uplink (shared by all
    its links); latency/jitter/loss apply to every link unless ``links`` overrides them."""

    links: dict[str, LinkConfig] = {}
    """Per destination node id: a profile replacing the defaults for that link."""
    cuts: list[CutConfig] = []
    """Links that go down for a while: ``{peer, start_s, end_s}`` tables (the link to node
    ``peer`` drops everything from start_s to end_s, counted from ``epoch``)."""
    epoch: float = 0.0
    """Unix time the cut windows count from (0: when the node starts)."""


class PipelineConfig(_Section):
    """SkipPipe (docs/ALGORITHMS.md section 5): the model (the built-in GPT, or model.factory's
    model that declares its stages: README, Pipelines) split into stages over the swarm's
    nodes; each microbatch takes its own scheduled path. Off while ``stages`` < 2."""

    stages: int = Field(0, ge=0)
    """S: pipeline stages (contiguous groups of blocks; stage 0 also holds the embedding, the
    head, the loss and the data). 0 or 1: no pipeline, every node trains the whole model."""
    stage: int | None = Field(None, ge=0)
    """This node's stage. None: ``assignment[i]`` for node ``node<i>`` of a local swarm
    (``loco swarm``/``loco run``), else i mod S."""
    assignment: list[int] = []
    """Stage of each node of a local swarm by index (empty: node i gets stage i mod S)."""
    auto_assign: bool = False
    """Move nodes between stages before training, from their measured compute speed and link
    latency/bandwidth (announced through the DHT), keeping each stage's replica count."""
    skip: float = Field(0.0, ge=0, lt=1)
    """Skip ratio: a path visits S − round(skip·S) stages (stage 0 included)."""
    paths: Literal["scheduled", "round_robin", "random"] = "scheduled"
    """How paths are chosen: the SkipPipe scheduler; round_robin = every stage in order, replicas
    taken in turn (the full-pipeline baseline; needs skip = 0); random = random valid paths."""
    swaps: bool = True
    """Allow a path to swap two adjacent stages (at most 2 swaps a path)."""
    microbatches: int = Field(4, ge=1)
    """Microbatches per iteration, over the whole swarm (each data.batch_size sequences)."""
    memory: int = Field(3, ge=1)
    """Microbatches a node holds in flight (activations kept for the backward pass)."""
    sync: Literal["every_step", "diloco", "noloco"] = "every_step"
    """How each stage's replicas stay in sync: gradients averaged every iteration, or local
    AdamW steps with an outer step every sync_every: DiLoCo (an all-reduce among the stage's
    replicas; optim.outer_lr/outer_momentum) or NoLoCo (gossip with random replicas of the
    stage; optim.noloco.*)."""
    sync_every: int = Field(10, ge=1)
    """Iterations between outer steps of a stage's replicas (sync = diloco or noloco)."""
    replica_exchange: Literal["direct", "collective"] = "direct"
    """How a stage's replicas average their gradients every iteration (sync = every_step):
    direct (each replica sends its gradient straight to the others the plan names and
    averages what came, in the same order as they: one one-way latency; a replica that
    missed a message steps apart, which the weights hashes sent along show at the next
    iteration, and it is then handed a replica's state again) or collective (the group
    all-reduce, whose leader makes the replicas agree before anyone steps: six one-way
    latencies)."""
    iteration_timeout_s: float = Field(120.0, gt=0)
    """A microbatch is given up as soon as a node on its path leaves the DHT, or when it is
    not done this long into the iteration (a message lost on the way); every node of its
    path is told, and the iteration ends without it."""
    eval_every: int = Field(10, ge=1)
    """Iterations between validation passes (forward along a full path, no skips)."""
    wire_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """How activations and their gradients travel between stages (the computation stays
    float32): bfloat16 or float16 halve the bytes of every hop, at a rounding error of at most
    2^-8 (bfloat16) or 2^-11 (float16, within its normal range: its range is narrower, and
    small gradients lose precision or vanish) relative to each value."""
    split: str | None = None
    """'module:callable' that takes the model and returns its ``loco.PipelineParts`` (embed,
    blocks, head), for a model without a ``pipeline_parts()`` method: e.g. "loco.hf:gpt2_parts"
    for a HuggingFace GPT-2. None: the model's own ``pipeline_parts()``."""

    @model_validator(mode="after")
    def _fits(self) -> PipelineConfig:
        # the value, not whether the key was set: a node reads its config with every field written out
        if self.replica_exchange != "direct" and self.sync != "every_step":
            raise ValueError(f"replica_exchange is how replicas average every iteration's gradients: it needs "
                             f"sync = 'every_step', not {self.sync!r}")
        if self.stages < 2:
            if self.split:
                raise ValueError("split cuts a model into pipeline stages: it needs stages >= 2")
            if self.wire_dtype != "float32":
                raise ValueError("wire_dtype is how activations travel between pipeline stages: it needs stages >= 2")
            return self
        visits = self.stages - round(self.skip * self.stages)
        if visits < 2:
            raise ValueError(f"skip {self.skip} leaves {visits} stage(s) a path; a path needs stage 0 "
                             f"and at least one other")
        if self.paths == "round_robin" and self.skip:
            raise ValueError("paths = round_robin is the full pipeline: it needs skip = 0")
        if self.stage is not None and self.stage >= self.stages:
            raise ValueError(f"stage {self.stage} does not exist (stages = {self.stages})")
        bad = [s for s in self.assignment if s >= self.stages]
        if bad:
            raise ValueError(f"assignment names stage {bad[0]}, but stages = {self.stages}")
        return self


class LoggingConfig(_Section):
    """Copies of every node's records (the JSONL file stays the reference) for TensorBoard
    and Weights & Biases, fed from the same records."""

    tensorboard: bool = False
    """Also write the records as TensorBoard scalars (train/loss; round/val_loss, the round's
    time split, bytes, ...) under OUT/tensorboard/<node>, against the inner step. Needs
    the tensorboard package (pip install 'loco[tensorboard]')."""
    wandb: Literal["off", "offline", "online"] = "off"
    """Also log them to a Weights & Biases run per node: offline (files under OUT/wandb, no
    network; upload later with `wandb sync`) or online (the server and login the
    environment configures). Needs the wandb package (pip install 'loco[wandb]')."""
    wandb_project: str = "loco"
    """The W&B project; each node is a run named by its node id, grouped by swarm.run_id."""


class Config(_Section):
    node: NodeConfig = NodeConfig()
    swarm: SwarmConfig = SwarmConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    collective: CollectiveConfig = CollectiveConfig()
    compression: CompressionConfig = CompressionConfig()
    train: TrainConfig = TrainConfig()
    network: NetworkConfig = NetworkConfig()
    pipeline: PipelineConfig = PipelineConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _pipeline_model(self) -> Config:
        p = self.pipeline
        if p.stages < 2:
            return self
        unused = [key for key in _UNUSED_BY_PIPELINES if _get(self, key) != _get(_DEFAULTS, key)]
        if unused:
            raise ValueError(f"pipeline.stages = {p.stages} does not use {', '.join(unused)}: a pipeline's replicas "
                             f"synchronize through pipeline.sync and pipeline.sync_every (compression.* applies to it, "
                             f"L-GreCo does not), in fp32; "
                             f"pipeline.eval_every sets its records")
        if self.node.nproc_per_node > 1:
            raise ValueError("pipeline.stages and node.nproc_per_node > 1: a pipeline stage is one process")
        if not self.model.factory and self.model.n_layer < p.stages:
            raise ValueError(f"pipeline.stages ({p.stages}) exceeds model.n_layer ({self.model.n_layer}): "
                             f"every stage needs at least one block")
        return self

    @model_validator(mode="after")
    def _rank_exchange(self) -> Config:
        noloco_whole = self.optim.algorithm == "noloco" and self.node.parallel != "fsdp"
        if self.node.rank_exchange == "leader" and (noloco_whole or self.compression.lgreco.enabled):
            raise ValueError("node.rank_exchange = 'leader' changes nothing with L-GreCo, or with noloco and "
                             "node.parallel 'ddp' (their exchange always leaves from rank 0): leave it at 'parallel'")
        return self

    @model_validator(mode="after")
    def _sharded_algorithms(self) -> Config:
        if self.node.parallel == "fsdp" and self.optim.algorithm == "ddp" and self.node.rank_exchange == "leader":
            raise ValueError("node.parallel = 'fsdp' with optim.algorithm 'ddp' averages every rank's region of the "
                             "gradients from its own endpoint: leave node.rank_exchange at 'parallel'")
        return self

    @model_validator(mode="after")
    def _lgreco_algorithms(self) -> Config:
        if self.compression.lgreco.enabled and self.optim.algorithm not in ("diloco", "co2"):
            raise ValueError(f"compression.lgreco works with optim.algorithm diloco or co2, "
                             f"not {self.optim.algorithm!r}")
        return self

    @field_validator("swarm")
    @classmethod
    def _key_from_env(cls, swarm: SwarmConfig) -> SwarmConfig:
        if swarm.key is None and os.environ.get("LOCO_SWARM_KEY") and not swarm.insecure:
            return swarm.model_copy(update={"key": os.environ["LOCO_SWARM_KEY"]})
        if swarm.key and swarm.insecure:
            raise ValueError("swarm.insecure = true with a swarm.key: choose one")
        return swarm


# What pipeline mode (node/pipeline/) has no use for: set to anything but its default
# beside pipeline.stages >= 2, it is an error rather than silently ignored.
_UNUSED_BY_PIPELINES = (
    "optim.algorithm", "optim.inner_steps", "optim.outer_state_device", "optim.streaming", "optim.co2",
    "train.max_tokens", "train.precision", "train.log_every", "train.compile", "compression.lgreco",
    "model.computes_loss",  # (a stage-0 node computes the loss from the head's logits)
)


def _get(cfg: BaseModel, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


_DEFAULTS = Config()


def _format_errors(exc: ValidationError, source: str, origins: dict[str, str] | None = None) -> str:
    """One line per problem, naming the key (and the environment variable that set it);
    an unknown key gets the nearest known one."""
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        origin = next((f" (from {var})" for k, var in (origins or {}).items()
                       if key == k or key.startswith(k + ".") or k.startswith(key + ".")), "")
        if err["type"] == "extra_forbidden":
            near = suggest(Config, err["loc"])
            lines.append(f"  {key}: unknown key{origin}" + (f" (did you mean {near}?)" if near else ""))
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r}){origin}")
    return "\n".join(lines)


def parse_override(item: str, what: str = "--set") -> tuple[list[str], Any]:
    """'optim.inner_steps=50' -> (['optim', 'inner_steps'], 50). Values are TOML literals;
    anything that is not one (a bare word, a path) is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"{what} {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"{what} {item!r}: empty key in {dotted!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str], what: str = "--set") -> dict[str, Any]:
    """``data`` with each dotted ``section.key=value`` set; ``what`` names where they came
    from in messages."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        keys, value = parse_override(item, what)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{what} {item!r}: {k!r} is a value, not a section")
            else:
                child = node[k] = dict(child)
            node = child
        node[keys[-1]] = value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file (or a JSON file, as the experiment runner writes for each node)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.suffix == ".json":
                return json.load(f)
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from exc


def build_config(data: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None) -> Config:
    """``origins``: dotted key -> the environment variable that set it (for messages)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, origins)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Defaults <- TOML file <- ``env``'s LOCO_SECTION__KEY variables <- --set overrides,
    validated as a whole. The CLI passes ``os.environ`` as ``env``; nothing else reads it."""
    data = read_toml(path) if path else {}
    source = str(path) if path else "defaults"
    origins: dict[str, str] = {}
    try:
        from_env = env_overrides(env or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for var, item in from_env:
        data = apply_overrides(data, [item], what=f"environment variable {var}")
        origins[item.split("=", 1)[0]] = var
    if from_env:
        source += " + environment"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set"
    return build_config(data, source, origins)


def config_to_dict(cfg: Config, redact: bool = False) -> dict[str, Any]:
    """``redact``: the swarm key is left out (the resolved config a node writes to --out
    must not hand the key to whoever reads its output folder)."""
    data = cfg.model_dump(mode="json")
    if redact and data["swarm"]["key"]:
        data["swarm"]["key"] = "<redacted>"
    return data
