"""Subcommands of the ``stemflow`` command line, one module each."""
