"""Propeller's manager core: a library with no UI dependency.

Import submodules directly (`core.protocol`, `core.service`, ...); this package imports nothing
heavy so the proplet can use the protocol without pulling in database drivers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("propeller")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
