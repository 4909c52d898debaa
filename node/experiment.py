"""Experiment files: the schema, network profiles, and per-node configs for each variant.

An experiment TOML names the swarm (node count, per-node overrides), the base node config,
a network profile, a fault schedule and the variants to compare; see configs/*.toml and
the README. Everything is validated before anything starts: a broken variant, an unknown
key or an impossible fault names itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import Config, ConfigError, apply_overrides, build_config, config_to_dict, read_toml
from .config_layers import env_overrides

# Built-in network profiles: the default link of every node, plus per-node overrides.
PROFILES: dict[str, dict[str, Any]] = {
    "none": {},
    "datacenter": {"bandwidth": "10gbit", "latency_ms": 0.1},
    "cross-region": {"bandwidth": "1gbit", "latency_ms": 40, "jitter_ms": 5},
    "home-broadband": {"bandwidth": "50mbit", "latency_ms": 20, "jitter_ms": 5},
    "wan-100mbit": {"bandwidth": "100mbit", "latency_ms": 50},
    # most nodes in a datacenter, the last one on a slow home link
    "mixed": {"bandwidth": "1gbit", "latency_ms": 10, "last_node": {"bandwidth": "20mbit", "latency_ms": 40}},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentInfo(_Strict):
    name: str = "experiment"
    """Used in the report title."""
    nodes: int = Field(4, ge=1, le=64)
    """Node processes per variant."""
    profile: str = "none"
    """Built-in network profile: none, datacenter, cross-region, home-broadband, wan-100mbit, mixed."""
    timeout_s: float = Field(1800, gt=0)
    """A variant still running after this long is stopped (and reported as such)."""

    @model_validator(mode="after")
    def _known_profile(self) -> ExperimentInfo:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; built-in: {', '.join(PROFILES)}")
        return self


class NodeOverride(_Strict):
    index: int = Field(ge=0)
    """Which node (0-based) this applies to."""
    set: dict[str, Any] = {}
    """Dotted config keys for that node, e.g. {"network.bandwidth" = "10mbit"}."""


class Fault(_Strict):
    action: Literal["kill", "stop", "restart", "pause", "cut"]
    """kill = SIGKILL; stop = SIGTERM; restart = start it again (resumes from its checkpoint);
    pause = SIGSTOP then SIGCONT after duration_s (a straggler); cut = the link node<->peer
    drops everything for duration_s."""
    node: int = Field(ge=0)
    """Node index."""
    at_s: float | None = Field(None, ge=0)
    """Seconds after the variant starts."""
    at_round: int | None = Field(None, ge=0)
    """Or: when the node reports having finished this round (restart: when any other node has)."""
    duration_s: float = Field(10.0, gt=0)
    """pause and cut: how long."""
    peer: int | None = Field(None, ge=0)
    """cut: the other end of the link."""

    @model_validator(mode="after")
    def _when(self) -> Fault:
        if (self.at_s is None) == (self.at_round is None):
            raise ValueError("give exactly one of at_s or at_round")
        if self.action == "cut":
            if self.peer is None:
                raise ValueError("a cut needs peer")
            if self.at_s is None:
                raise ValueError("a cut is scheduled by time (at_s), not by round")
        return self


class Variant(_Strict):
    name: str = Field(min_length=1)
    """Row label in the report; also the variant's folder name."""
    set: dict[str, Any] = {}
    """Dotted config keys that differ from [base] for this variant."""


class Experiment(_Strict):
    experiment: ExperimentInfo = ExperimentInfo()
    base: dict[str, Any] = {}
    """Node config (any sections of the node config) shared by every node of every variant."""
    network: dict[str, Any] = {}
    """Link settings layered over the profile (bandwidth, latency_ms, jitter_ms, loss)."""
    node: list[NodeOverride] = []
    fault: list[Fault] = []
    variant: list[Variant] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        n = self.experiment.nodes
        names = [v.name for v in self.variant]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        for v in names:
            if not v.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"variant name {v!r}: use letters, digits, - _ . only")
        for i, f in enumerate(self.fault):
            if f.node >= n or (f.peer is not None and f.peer >= n):
                raise ValueError(f"fault[{i}] names node {max(f.node, f.peer or 0)}, but there are {n} nodes")
        for o in self.node:
            if o.index >= n:
                raise ValueError(f"node override for index {o.index}, but there are {n} nodes")
        return self


def _dotted(d: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted overrides; a table value (e.g. network.links = {node2 = {...}}) becomes one
    override per leaf, since JSON objects are not TOML literals."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def load_experiment(path: str | Path, overrides: list[str] | None = None,
                    env: Mapping[str, str] | None = None) -> Experiment:
    """An experiment file <- ``env``'s LOCO_SECTION__KEY variables, applied to its ``base``
    (the nodes' shared config) <- ``overrides`` (dotted keys of the experiment file itself:
    ``base.optim.inner_steps=50``)."""
    data = read_toml(path)
    try:
        from_env = env_overrides(env or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for var, item in from_env:
        data = apply_overrides(data, [f"base.{item}"], what=f"environment variable {var}")
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid experiment ({path}):"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "extra_forbidden" and len(err["loc"]) == 1 and err["loc"][0] in Config.model_fields:
                msg += f" of an experiment: node config overrides go under base. (--set base.{key}.…)"
            lines.append(f"  {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    for v in exp.variant:  # fail before anything starts: every node config of every variant,
        for i in range(exp.experiment.nodes):  # also as its node reads it (every field written out)
            build_config(config_to_dict(node_config(exp, v, i, epoch=0.0)), f"variant {v.name!r}, node {i}")
    return exp


def node_config(exp: Experiment, variant: Variant, index: int, epoch: float) -> Config:
    """The full config of node ``index`` in ``variant``: base <- profile/network <- node
    override <- variant, with the experiment's link cuts for this node."""
    n = exp.experiment.nodes
    profile = dict(PROFILES[exp.experiment.profile])
    last = profile.pop("last_node", None)
    link = {**profile, **exp.network}
    if last and index == n - 1:
        link.update(last)
    data: dict[str, Any] = json.loads(json.dumps(exp.base))  # deep copy
    data.setdefault("network", {}).update(link)
    cuts = []
    for f in exp.fault:
        if f.action == "cut" and index in (f.node, f.peer):
            other = f.peer if index == f.node else f.node
            cuts.append({"peer": f"node{other}", "start_s": f.at_s, "end_s": f.at_s + f.duration_s})
    data["network"]["cuts"] = data["network"].get("cuts", []) + cuts
    data["network"]["epoch"] = epoch
    data.setdefault("node", {})["id"] = f"node{index}"
    sets = []
    for o in exp.node:
        if o.index == index:
            sets += _dotted(o.set)
    sets += _dotted(variant.set)
    try:
        data = apply_overrides(data, sets)
        return build_config(data, f"variant {variant.name!r}, node {index}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}") from None
