"""loco: low-communication decentralized training as a library.

(pyproject.toml maps the package name ``loco`` onto this folder; the daemon, the network
and the math are ``loco.node``, ``loco.protocols`` and ``loco.optim``.)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loco")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
