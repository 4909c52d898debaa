"""Everything that crosses the network. Never imports optim or node.

- wire.py        the message format: frame layout, signing, strict decoding (one place)
- messages.py    every message kind and the schema of its meta, checked before delivery
- transport.py   ZeroMQ ROUTER/DEALER transport, I/O thread, mailbox with deadlines, byte counts
- membership.py  swarm membership through a real hivemind DHT (announce, refresh, expire, leave)
- identity.py    per-node Ed25519 keys, and the binding of node ids to keys (trust on first use)
- dht_records.py DHT records signed with the swarm key (others' are ignored)
- collective.py  group all-reduce: leader matchmaking, reduce-scatter/all-gather, commit/retry
- gossip.py      NoLoCo's exchange within a small random group: seeded pairing, declines, deadline
- state_sync.py  serving and fetching synchronized state (late join, resync, CO2's missed reduces)
- shaper.py      in-transport network emulation: bandwidth, latency, jitter, loss, cuts
- flat.py        a list of tensors as one flat vector, without a copy when they are views of one
- codecs/        compression: one file per codec, the layer-aware compressor with error
                 feedback, L-GreCo's per-layer plans
- pipeline/      SkipPipe path scheduling and its throughput model
"""
