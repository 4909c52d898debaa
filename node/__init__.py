"""The node daemon and everything that reads config, flags and environment. Installed as
``loco.node``; its folder api/ is the public library, installed as ``loco`` itself.

- api/           the library API the daemon is written against (see api/__init__.py)
- build.py       config sections -> library objects (Swarm, the configured algorithm), by keyword
- runtime.py     shared by the daemon, the pipeline node and the library: transport and DHT
                 membership from their settings, node ids, atomic JSON files
- cli.py         the `loco` command (click): node start, swarm, run, report
- config.py      typed configuration (pydantic), TOML files, --set overrides, clear errors
- daemon.py      a node's lifecycle on the library: setup, resume, loop, records, checkpoints, shutdown
- trainer.py     the inner loop: model, inner AdamW, data stream, validation
- model.py       the built-in byte-level GPT and user model factories
- data.py        default corpus (Python stdlib source), user data, per-node sampling
- sync.py        optim's communicators backed by protocols: the collective, NoLoCo's gossip
- optstate.py    AdamW moments as a flat tensor list (DDP's state hand-off, pipeline joins)
- staging.py     GPU tensors through reused pinned host buffers
- checkpoint.py  atomic checkpoints
- metrics.py     JSON-lines metrics
- swarm.py       local multi-process swarm launcher with progress and summary
- experiment.py  experiment files: schema, network profiles, per-node configs of each variant
- runner.py      `loco run`: variants as local swarms, fault schedule
- report.py      report.md, plots and summary.json from the metrics alone
- reaper.py      kills a node's helper processes (DHT, p2pd) if the node dies abruptly
"""
