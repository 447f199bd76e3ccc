"""HyTRec: online recommendations for very long behaviour histories.

The checkout's top-level folders (``model/``, ``service/``, ``state_store/``, ...) install as ``hytrec.*``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hytrec")
except PackageNotFoundError:  # pragma: no cover - running from a checkout that was never installed
    __version__ = "0+unknown"
