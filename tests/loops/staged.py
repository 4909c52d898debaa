"""Start a process now, run it later: ``python -m tests.loops.staged GOFILE (-m MODULE | SCRIPT) ARGS...``
imports torch, hivemind and loco, then waits until GOFILE exists and runs the module or
script with ARGS as if it had been started then.

A test that restarts a node, or adds a late joiner, starts that process with the others,
while the machine is not yet busy with their training: on a loaded 2-core machine the
imports alone (several CPU seconds) take tens of seconds beside nodes that train flat out,
and the test would wait for them. What the test checks (a new process with the same
command: its state, ports, identity and joining) all happens after GOFILE appears."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    go, rest = Path(sys.argv[1]), sys.argv[2:]
    import hivemind  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (what the first optimizer would import)

    import loco  # noqa: F401

    module = rest[1] if rest[0] == "-m" else None
    if module == "loco.node.cli":
        import loco.node.daemon  # noqa: F401
    while not go.exists():  # no event crosses processes here: poll, cheaply
        time.sleep(0.05)
    if module is not None:
        sys.argv = [module, *rest[2:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
