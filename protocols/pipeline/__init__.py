"""Pipeline routing (SkipPipe): which nodes each microbatch visits.

- schedule.py  path rules, the throughput model (simulator), baselines and the scheduler
"""
