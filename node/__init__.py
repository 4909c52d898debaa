"""The node daemon and everything that reads config, flags and environment.

- cli.py         the `loco` command (click): node start, swarm, run, report
- config.py      typed configuration (pydantic), TOML files, --set overrides, clear errors
- daemon.py      a node's lifecycle: setup, rounds, resync, checkpoints, clean shutdown
- trainer.py     the inner loop: model, inner AdamW, data stream, validation
- model.py       the built-in byte-level GPT and user model factories
- data.py        default corpus (Python stdlib source), user data, per-node sampling
- sync.py        optim's communicators backed by protocols: the collective, NoLoCo's gossip
- checkpoint.py  atomic checkpoints
- metrics.py     JSON-lines metrics
- swarm.py       local multi-process swarm launcher with progress and summary
- experiment.py  experiment files: schema, network profiles, per-node configs of each variant
- runner.py      `loco run`: variants as local swarms, fault schedule
- report.py      report.md, plots and summary.json from the metrics alone
- reaper.py      kills a node's helper processes (DHT, p2pd) if the node dies abruptly
"""
