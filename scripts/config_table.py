"""Write the configuration table into README.md from the config's field docstrings.

    python scripts/config_table.py          # rewrite README.md's table
    python scripts/config_table.py --check  # exit 1 if it is out of date

tests/test_config_layers.py fails when the README's table and node/config.py drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loco.node.config_docs import with_table

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the table is stale")
    args = parser.parse_args()
    text = README.read_text()
    new = with_table(text)
    if args.check:
        if new != text:
            print("README.md's configuration table is out of date: run python scripts/config_table.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
