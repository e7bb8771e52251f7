"""memvidd: the daemon that keeps memory capsules current and serves them to agents.

The storage engine lives in the separate ``engine`` package; this package uses only its
public API (``tests/test_layering.py`` enforces that).
"""

__version__ = "0.1.0"
