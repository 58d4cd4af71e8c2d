"""Subcommands of the ``beats`` command line, one module each (see `beats.cli`)."""
