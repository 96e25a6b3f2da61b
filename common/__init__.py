"""Code shared by the gateway's processes and its command line: configuration, wire, logs."""

# The single source of the version: pyproject.toml reads it, and the processes log it.
__version__ = "0.1.0"
