"""Run a script with loco's log lines on stderr (INFO and up), so that a failed test shows
what the library did: ``python -m tests.loops.logged SCRIPT ARGS...``."""

from __future__ import annotations

import logging
import runpy
import sys

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
