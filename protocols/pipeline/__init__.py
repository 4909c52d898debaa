"""Pipeline routing (SkipPipe): which nodes each microbatch visits.

- schedule.py  path rules, the throughput model (simulator), baselines and the scheduler
- plan.py      the protocol: message kinds, plan and task validation, the leader and
               admission rules, one node's share of an iteration
- channel.py   what reaches a node, sorted by what its loop waits for
- probe.py     link latency and bandwidth probes
"""
