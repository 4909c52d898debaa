"""SkipPipe path scheduling (Blagoev et al. 2025), docs/ALGORITHMS.md section 5: which nodes each
microbatch visits, and in which order, so that an iteration finishes soonest.

A pure algorithm over a throughput model; no network, no torch.

Setting: S stages (stage 0 holds data, embedding, head and loss), nodes assigned to
stages (several per stage: data-parallel replicas), each with a compute speed and a memory
(microbatches in flight); links with latency and bandwidth; M microbatches per iteration.

A path is the node sequence of one microbatch's forward pass, [stage-0 node, ..., same
stage-0 node]; the backward pass retraces it. Rules (``check_path``):

- stage 0 first and last (the same node: it holds the loss), no other stage twice;
- exactly ``visits`` stages including 0 (the skip ratio: visits = S − round(skip·S));
- a jump goes at most ``max_jump`` (4) stages ahead of the highest stage reached;
- a swap (going to a stage below the highest reached) only to the stage just below it,
  and at most ``max_swaps`` (2) per path; none when swaps are off.

Throughput model (``simulate``): forward on node n costs ``layers·w / speed_n``, backward
1.5× that; a hop costs latency + bytes/bandwidth + overhead; a node runs one task at a
time (forward before backward when both wait), and holds at most ``memory_n``
microbatches (from its forward until its backward is done). Iteration time = when the
last backward returns to stage 0.

Scheduler (``schedule``): stage sets dealt so every stage gets its share of visits, then
microbatch by microbatch an exact shortest-time search over (stage order, node) in the
layered graph given the reservations made so far (the role A* plays in the paper), then
rounds of re-planning each microbatch against all the others (conflict resolution) while
the simulated iteration time improves. Collisions and memory are resolved by the
simulator's queueing, so every schedule it returns is valid by construction; a swap that
would deadlock the iteration on memory (a cycle of microbatches, each waiting for a slot
another holds) makes it plan ascending orders instead, which cannot deadlock.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PipeNode:
    id: str
    stage: int
    speed: float = 1.0  # relative compute speed (1: the reference)
    memory: int = 3  # microbatches in flight at most


@dataclass
class Setting:
    stages: int
    nodes: list[PipeNode]
    microbatches: int
    skip: float = 0.0
    latency_s: dict[tuple[str, str], float] = field(default_factory=dict)  # one-way, per ordered pair
    bandwidth_bps: dict[tuple[str, str], float] = field(default_factory=dict)  # bytes/s
    default_latency_s: float = 0.0
    default_bandwidth_bps: float = 1e9
    activation_bytes: float = 1e6
    layer_s: float = 1.0  # forward time of one layer for one microbatch at speed 1
    layers_per_stage: float = 1.0
    overhead_s: float = 0.0
    swaps: bool = True
    max_swaps: int = 2
    max_jump: int = 4

    @property
    def visits(self) -> int:
        """Stages a path visits, stage 0 included."""
        return max(1, self.stages - round(self.skip * self.stages))

    def replicas(self, stage: int) -> list[PipeNode]:
        return [n for n in self.nodes if n.stage == stage]

    def node(self, node_id: str) -> PipeNode:
        return self._by_id[node_id]

    def __post_init__(self) -> None:
        self._by_id = {n.id: n for n in self.nodes}
        if len(self._by_id) != len(self.nodes):
            raise ValueError("node ids must be unique")
        for s in range(self.stages):
            if not self.replicas(s):
                raise ValueError(f"stage {s} has no node")
        if any(n.stage < 0 or n.stage >= self.stages for n in self.nodes):
            raise ValueError("a node is assigned to a stage that does not exist")

    def hop_s(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        lat = self.latency_s.get((a, b), self.default_latency_s)
        bw = self.bandwidth_bps.get((a, b), self.default_bandwidth_bps)
        return lat + self.activation_bytes / bw + self.overhead_s

    def compute_s(self, node: str, backward: bool, part: float = 1.0) -> float:
        return part * self.layers_per_stage * self.layer_s / self.node(node).speed * (1.5 if backward else 1.0)


def check_path(setting: Setting, path: Sequence[str]) -> list[str]:
    """Every rule a path breaks (empty: valid)."""
    problems = []
    if len(path) < 2 or path[0] != path[-1]:
        return ["a path starts and ends at the same stage-0 node"]
    stages = [setting.node(n).stage for n in path[:-1]]
    if stages[0] != 0:
        problems.append("first stage is not 0")
    if 0 in stages[1:]:
        problems.append("stage 0 in the middle")
    if len(set(stages)) != len(stages):
        problems.append("a stage visited twice")
    if len(stages) != setting.visits:
        problems.append(f"{len(stages)} stages visited, the skip ratio asks for {setting.visits}")
    highest, swaps = 0, 0
    for s in stages[1:]:
        if s > highest:
            if s - highest > setting.max_jump:
                problems.append(f"jump of {s - highest} stages")
            highest = s
        else:
            swaps += 1
            if s != highest - 1:
                problems.append(f"swap to stage {s} below {highest} is not to the adjacent stage")
    if swaps > (setting.max_swaps if setting.swaps else 0):
        problems.append(f"{swaps} swaps")
    return problems


@dataclass
class Task:
    mb: int
    index: int  # position in the microbatch's chain
    node: str
    duration: float
    backward: bool
    takes_slot: bool  # the microbatch's first visit to this node
    frees_slot: bool  # its last task on this node


def _chain(setting: Setting, mb: int, path: Sequence[str]) -> list[Task]:
    """Forward along the path (stage 0 split in embedding and head+loss), backward back."""
    inner = list(path[1:-1])
    home = path[0]
    fwd = [(home, 0.5)] + [(n, 1.0) for n in inner] + [(home, 0.5)]
    bwd = [(home, 0.5)] + [(n, 1.0) for n in reversed(inner)] + [(home, 0.5)]
    steps = [(n, p, False) for n, p in fwd] + [(n, p, True) for n, p in bwd]
    first = {}
    last = {}
    for i, (n, _, _) in enumerate(steps):
        first.setdefault(n, i)
        last[n] = i
    return [Task(mb, i, n, setting.compute_s(n, b, p), b, first[n] == i, last[n] == i)
            for i, (n, p, b) in enumerate(steps)]


@dataclass
class SimResult:
    makespan: float  # inf if the schedule deadlocks on memory
    finish: list[float]  # per microbatch
    busy: dict[str, float]  # compute seconds per node
    max_in_flight: dict[str, int]
    intervals: dict[str, list[tuple[float, float, int]]]  # per node: (start, end, microbatch)


def simulate(setting: Setting, paths: Sequence[Sequence[str]]) -> SimResult:
    """Run the throughput model: nodes serve one task at a time, forward first, within memory."""
    chains = [_chain(setting, m, p) for m, p in enumerate(paths)]
    ready = {(m, 0): 0.0 for m in range(len(chains))}  # task -> time its input is there
    free_at = {n.id: 0.0 for n in setting.nodes}
    slots = {n.id: 0 for n in setting.nodes}
    peak = {n.id: 0 for n in setting.nodes}
    busy = {n.id: 0.0 for n in setting.nodes}
    intervals: dict[str, list[tuple[float, float, int]]] = {n.id: [] for n in setting.nodes}
    finish = [math.inf] * len(chains)
    remaining = sum(len(c) for c in chains)
    while remaining:
        best = None  # (start, not forward-first key, ready, mb, index)
        for (m, i), r in ready.items():
            t = chains[m][i]
            if t.takes_slot and slots[t.node] >= setting.node(t.node).memory:
                continue
            start = max(r, free_at[t.node])
            key = (start, t.backward, r, m)
            if best is None or key < best[0]:
                best = (key, m, i)
        if best is None:
            return SimResult(math.inf, finish, busy, peak, intervals)  # memory deadlock
        (start, *_), m, i = best
        # a forward that could start at the same time on the same node goes first
        t = chains[m][i]
        end = start + t.duration
        del ready[(m, i)]
        free_at[t.node] = end
        busy[t.node] += t.duration
        intervals[t.node].append((start, end, m))
        if t.takes_slot:
            slots[t.node] += 1
            peak[t.node] = max(peak[t.node], slots[t.node])
        if t.frees_slot:
            slots[t.node] -= 1
        remaining -= 1
        if i + 1 < len(chains[m]):
            nxt = chains[m][i + 1]
            ready[(m, i + 1)] = end + setting.hop_s(t.node, nxt.node)
        else:
            finish[m] = end
    return SimResult(max(finish, default=0.0), finish, busy, peak, intervals)


# ------------------------------------------------------------------ paths
def _stage_orders(setting: Setting, stages: Sequence[int]) -> list[list[int]]:
    """Visiting orders of a sorted stage set: ascending, plus (if allowed) adjacent swaps."""
    base = list(stages)
    orders = [base]
    if not setting.swaps:
        return orders
    spots = [i for i in range(len(base) - 1) if base[i + 1] == base[i] + 1]
    for count in range(1, setting.max_swaps + 1):
        for combo in itertools.combinations(spots, count):
            if any(b - a < 2 for a, b in itertools.pairwise(combo)):
                continue  # overlapping swaps would move a stage twice
            order = list(base)
            for i in combo:
                order[i], order[i + 1] = order[i + 1], order[i]
            if _order_jumps_ok(setting, order):
                orders.append(order)
    return orders


def _order_jumps_ok(setting: Setting, order: Sequence[int]) -> bool:
    """No step goes more than max_jump above the highest stage reached so far."""
    highest = 0
    for s in order:
        if s - highest > setting.max_jump:
            return False
        highest = max(highest, s)
    return True


def _jumps_ok(setting: Setting, stages: Sequence[int]) -> bool:
    prev = 0
    for s in sorted(stages):
        if s - prev > setting.max_jump:
            return False
        prev = s
    return True


def balanced_stage_sets(setting: Setting, rng: random.Random) -> list[list[int]]:
    """Per microbatch, the stages it visits besides 0: each stage gets its share of visits
    (counts differ by at most one where the jump rule allows), chosen least-used first."""
    k = setting.visits - 1
    counts = {s: 0 for s in range(1, setting.stages)}
    out = []
    for _ in range(setting.microbatches):
        order = sorted(counts, key=lambda s: (counts[s], rng.random()))
        chosen = None
        for combo in itertools.combinations(order, k):  # least-used combinations come first
            if _jumps_ok(setting, combo):
                chosen = sorted(combo)
                break
        if chosen is None:
            raise ValueError("no stage set satisfies the jump rule at this skip ratio")
        for s in chosen:
            counts[s] += 1
        out.append(chosen)
    return out


def full_pipeline(setting: Setting) -> list[list[str]]:
    """Every microbatch through every stage, replicas taken round-robin (the baseline)."""
    paths = []
    for m in range(setting.microbatches):
        nodes = [setting.replicas(s)[m % len(setting.replicas(s))].id for s in range(setting.stages)]
        paths.append([*nodes, nodes[0]])
    return paths


def random_paths(setting: Setting, rng: random.Random) -> list[list[str]]:
    """Valid paths at random: balanced stage sets with random tie-breaks (load balance is one
    of the rules), random orders and random replicas. Like the scheduler, swaps that would
    deadlock the iteration on memory are undone."""
    paths: list[list[str]] = []
    for stages in balanced_stage_sets(setting, rng):
        order = rng.choice(_stage_orders(setting, stages))
        home = rng.choice(setting.replicas(0)).id
        picks = {s: rng.choice(setting.replicas(s)).id for s in stages}
        paths.append([home, *(picks[s] for s in order), home])
    if simulate(setting, paths).makespan == math.inf:  # undo the swaps: ascending cannot deadlock
        paths = [[p[0], *sorted(p[1:-1], key=lambda n: setting.node(n).stage), p[0]] for p in paths]
    return paths


# ---------------------------------------------------------------- schedule
class _Reservations:
    """Busy intervals per node from the microbatches planned so far (for the search)."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.busy: dict[str, list[tuple[float, float]]] = {n.id: [] for n in setting.nodes}

    def earliest(self, node: str, ready: float, duration: float) -> float:
        t = ready
        for a, b in sorted(self.busy[node]):
            if b <= t:
                continue
            if a >= t + duration:
                break
            t = b
        return t

    def add(self, node: str, start: float, duration: float) -> None:
        self.busy[node].append((start, start + duration))


def _best_nodes(setting: Setting, order: Sequence[int], res: _Reservations) -> tuple[float, list[str]]:
    """Earliest forward completion over (stage position, node): a shortest-path search in the
    layered graph with waiting for busy nodes (waiting never helps to arrive earlier, so the
    earliest arrival per node is optimal). Returns the estimated end of the backward pass."""
    frontier: dict[str, tuple[float, list[str]]] = {}
    for home in setting.replicas(0):
        d = setting.compute_s(home.id, False, 0.5)
        frontier[home.id] = (res.earliest(home.id, 0.0, d) + d, [home.id])
    for s in order:
        nxt: dict[str, tuple[float, list[str]]] = {}
        for node in setting.replicas(s):
            d = setting.compute_s(node.id, False)
            for prev, (t, path) in frontier.items():
                start = res.earliest(node.id, t + setting.hop_s(prev, node.id), d)
                # the backward pass will cross this link the other way: count it now, so
                # the search weighs whole round trips (exact without contention)
                arrive = start + d + setting.hop_s(node.id, prev)
                if node.id not in nxt or arrive < nxt[node.id][0]:
                    nxt[node.id] = (arrive, [*path, node.id])
        frontier = nxt
    best = None
    for last, (t, path) in frontier.items():
        home = path[0]
        back = t + setting.hop_s(last, home) + setting.hop_s(home, last) + setting.compute_s(home, False, 0.5)
        back += sum(setting.compute_s(n, True) for n in path[1:]) + setting.compute_s(home, True)
        if best is None or back < best[0]:
            best = (back, [*path, home])
    assert best is not None
    return best


def _reserve(setting: Setting, res: _Reservations, path: Sequence[str]) -> None:
    """Book the microbatch's tasks, in chain order, at the earliest free times."""
    t, prev = 0.0, None
    for task in _chain(setting, 0, path):
        if prev is not None:
            t += setting.hop_s(prev, task.node)
        start = res.earliest(task.node, t, task.duration)
        res.add(task.node, start, task.duration)
        t, prev = start + task.duration, task.node


def _plan_one(setting: Setting, stages: Sequence[int], res: _Reservations, swaps: bool = True,
              exhaustive_limit: int = 64) -> list[str]:
    """The best path for one microbatch over the given stage set, against the bookings so
    far: every node combination when there are few (exact for this microbatch), else the
    layered shortest-path search."""
    best = None
    for order in (_stage_orders(setting, stages) if swaps else [list(stages)]):
        choices = [setting.replicas(0), *(setting.replicas(s) for s in order)]
        if math.prod(len(c) for c in choices) <= exhaustive_limit:
            for combo in itertools.product(*choices):
                path = [n.id for n in combo] + [combo[0].id]
                t = _best_nodes_time(setting, path, res)
                if best is None or t < best[0]:
                    best = (t, path)
        else:
            _, path = _best_nodes(setting, order, res)
            t = _best_nodes_time(setting, path, res)
            if best is None or t < best[0]:
                best = (t, path)
    assert best is not None
    return best[1]


def _plan_greedy(setting: Setting, rng: random.Random, max_candidates: int = 24
                 ) -> tuple[list[list[int]], list[list[str]]]:
    """Microbatch by microbatch: among the stage sets that keep the load balanced (the
    least-used stages first), the one whose best path finishes soonest."""
    k = setting.visits - 1
    counts = {s: 0 for s in range(1, setting.stages)}
    res = _Reservations(setting)
    sets, paths = [], []
    for _ in range(setting.microbatches):
        combos = [c for c in itertools.combinations(sorted(counts), k) if _jumps_ok(setting, c)]
        if not combos:
            raise ValueError("no stage set satisfies the jump rule at this skip ratio")
        least = min(sum(counts[s] for s in c) for c in combos)
        tied = [list(c) for c in combos if sum(counts[s] for s in c) == least]
        rng.shuffle(tied)
        best = None
        for stages in tied[:max_candidates]:
            path = _plan_one(setting, stages, res, setting.swaps)
            t = _best_nodes_time(setting, path, res)
            if best is None or t < best[0]:
                best = (t, stages, path)
        assert best is not None
        _, stages, path = best
        for s in stages:
            counts[s] += 1
        _reserve(setting, res, path)
        sets.append(stages)
        paths.append(path)
    return sets, paths


def _best_nodes_time(setting: Setting, path: Sequence[str], res: _Reservations) -> float:
    """When this path's backward would end given the reservations (no booking)."""
    t, prev = 0.0, None
    for task in _chain(setting, 0, path):
        if prev is not None:
            t += setting.hop_s(prev, task.node)
        t = res.earliest(task.node, t, task.duration) + task.duration
        prev = task.node
    return t


def _plan_all(setting: Setting, stage_sets: Sequence[Sequence[int]], swaps: bool) -> list[list[str]]:
    res = _Reservations(setting)
    paths = []
    for stages in stage_sets:
        path = _plan_one(setting, stages, res, swaps)
        _reserve(setting, res, path)
        paths.append(path)
    return paths


def schedule(setting: Setting, seed: int = 0, rounds: int = 3) -> list[list[str]]:
    """Paths for every microbatch of one iteration (see the module docstring)."""
    rng = random.Random(seed)
    stage_sets, paths = _plan_greedy(setting, rng)
    if setting.swaps and simulate(setting, paths).makespan == math.inf:
        # swaps closed a cycle of microbatches, each waiting for a memory slot another
        # holds; ascending orders never do (a backward pass needs no new slot)
        paths = _plan_all(setting, stage_sets, swaps=False)
    # the round-robin assignment of the same stage sets (the full pipeline when nothing is
    # skipped) is a candidate too: the search never returns something the model says is worse
    robin = [[setting.replicas(0)[m % len(setting.replicas(0))].id,
              *(setting.replicas(s)[m % len(setting.replicas(s))].id for s in stages),
              setting.replicas(0)[m % len(setting.replicas(0))].id] for m, stages in enumerate(stage_sets)]
    best = simulate(setting, paths).makespan
    robin_span = simulate(setting, robin).makespan
    if robin_span < best:
        paths, best = robin, robin_span
    for _ in range(rounds):  # conflict resolution: re-plan each microbatch against the rest
        improved = False
        finish = simulate(setting, paths).finish
        for m in sorted(range(len(paths)), key=lambda i: -finish[i]):
            others = _Reservations(setting)
            for j, p in enumerate(paths):
                if j != m:
                    _reserve(setting, others, p)
            candidate = _plan_one(setting, stage_sets[m], others, setting.swaps)
            if candidate == paths[m]:
                continue
            trial = [*paths[:m], candidate, *paths[m + 1:]]
            span = simulate(setting, trial).makespan
            if span < best:
                paths, best, improved = trial, span, True
        if not improved:
            break
    return paths




def with_stages(setting: Setting, stage_of: dict[str, int]) -> Setting:
    """The same setting with nodes moved to other stages."""
    nodes = [PipeNode(n.id, stage_of.get(n.id, n.stage), n.speed, n.memory) for n in setting.nodes]
    return Setting(setting.stages, nodes, setting.microbatches, setting.skip, setting.latency_s,
                   setting.bandwidth_bps, setting.default_latency_s, setting.default_bandwidth_bps,
                   setting.activation_bytes, setting.layer_s, setting.layers_per_stage, setting.overhead_s,
                   setting.swaps, setting.max_swaps, setting.max_jump)


def assign_stages(setting: Setting, passes: int = 2, seed: int = 0) -> Setting:
    """Place nodes on stages from their speeds and links: local search over swaps of two
    nodes' stages (stage sizes stay as given), keeping a swap when the scheduled iteration
    time in the model drops. The paper uses a genetic algorithm for this step; any search
    that only accepts improvements never does worse than the assignment it starts from."""
    best_setting = setting
    best = simulate(setting, schedule(setting, seed)).makespan
    ids = [n.id for n in setting.nodes]
    for _ in range(passes):
        improved = False
        for a, b in itertools.combinations(ids, 2):
            sa, sb = best_setting.node(a).stage, best_setting.node(b).stage
            if sa == sb:
                continue
            trial = with_stages(best_setting, {a: sb, b: sa})
            span = simulate(trial, schedule(trial, seed)).makespan
            if span < best - 1e-9:
                best_setting, best, improved = trial, span, True
        if not improved:
            break
    return best_setting


__all__ = ["PipeNode", "Setting", "SimResult", "assign_stages", "balanced_stage_sets", "check_path", "full_pipeline",
           "random_paths", "schedule", "simulate", "with_stages"]
