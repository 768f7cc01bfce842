"""``python -m r1serve`` runs the CLI."""

from r1serve.cli import app

app()
