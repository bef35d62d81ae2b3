"""The ``oodlab`` command: one module per subcommand group, all thin over the library."""

from oodlab.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
