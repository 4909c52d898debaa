"""Everything that crosses the network. Never imports optim or node.

- wire.py        the message format: frame layout, signing, strict decoding (one place)
- transport.py   ZeroMQ ROUTER/DEALER transport, I/O thread, mailbox with deadlines, byte counts
- membership.py  swarm membership through a real hivemind DHT (announce, refresh, expire, leave)
- collective.py  group all-reduce: leader matchmaking, reduce-scatter/all-gather, commit/retry
- state_sync.py  serving and fetching synchronized state (late join, resync after a missed round)
- codecs.py      the codec interface tensors pass through inside collectives (identity for now)
"""
