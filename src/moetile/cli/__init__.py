"""Command-line interface: `moetile info | audit | bench | profile | run`."""
