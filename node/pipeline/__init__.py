"""The SkipPipe node (docs/ALGORITHMS.md section 5): one stage of the GPT, microbatches that arrive
along scheduled paths, and the stage's replicas kept in sync.

One iteration, as a node sees it::

    leader   the live stage-0 node with the smallest id: reads the roster (stage, compute
             speed, measured links) from the DHT, schedules one path per microbatch
             (protocols.pipeline.schedule) and sends PLAN(it) = paths + endpoints to all.
    owner    a stage-0 node at the head of a path: draws a batch, embeds it, sends the
             activation to the next node of the path (FWD); at the end of the path it
             computes the loss and sends the gradient back along the reverse path (BWD).
    others   run their blocks on each FWD that arrives (at most ``memory`` microbatches held
             for their backward pass; later ones wait), and on each BWD run the backward
             pass and send the input's gradient one hop back.
    step     once every task of the iteration that this node had is done (or the iteration
             deadline passed: a node on a path died), the stage's replicas average their
             gradients (sync = every_step) or step locally and run a DiLoCo outer step every
             ``sync_every`` iterations (sync = diloco).

There is no barrier between iterations: a node starts iteration it + 1 when it has the plan
and has finished its own part of it. The math is the synchronous pipeline's, because each
node steps only after all of its work of the iteration. Messages of an iteration that a
node has not reached wait in a queue. Paths travel in the plan, so only the leader needs
the schedule; a node that dies disappears from the DHT within ``swarm.announce_ttl_s`` and
from the next plan; microbatches already on its path are given up at the deadline. If the
leader dies, the next stage-0 node by id plans the iteration the others are waiting for.

Who takes part: the members of the last plan that are still alive under the same endpoint.
Any other live node (one started late, or restarted: a new endpoint) joins. The plan of
iteration k names it in ``joins`` with a source, a member replica of its stage, which
sends it the stage state (weights, AdamW moments, outer state) after its step of k; the
joiner takes part from k + 1, bit-identical to the source. A joiner whose stage has no
member (source "") brings its own state and takes part in k at once.

The node is made of parts with one job each:

    standing.py       where the node stands (stage, iteration, member or joining), as announced
    post.py           sending by node name, to itself through its channel; drops counted
    stage_state.py    the stage's blocks, inner AdamW and outer optimizer: hand-off and checkpoint form
    checkpoints.py    periodic, atomic checkpoints in the background; a sole replica's resume
    replica_sync.py   the stage's replicas kept in sync after each iteration's step
    compute.py        this node's microbatch tasks of one iteration (forward, backward, give-up)
    planning.py       leadership and the plans: admission, paths, relaying a dead leader's plan
    joining.py        becoming a member: the hand-off from a replica, or the node's own state
    placement.py      measuring compute and links; pipeline.auto_assign's placement
    node.py           the lifecycle: setup, the iteration loop, records, ordered shutdown
"""

from .node import PipelineNode, node_stage

__all__ = ["PipelineNode", "node_stage"]
