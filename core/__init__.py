"""Propeller's manager core: a library with no UI dependency.

Import submodules directly (`core.protocol`, `core.service`, ...); this package imports nothing
heavy so the proplet can use the protocol without pulling in database drivers.
"""

# The single source of the version (pyproject.toml reads it from here); a literal because
# importlib.metadata costs ~60 ms at every start.
__version__ = "0.1.0"
