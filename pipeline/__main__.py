"""``python -m pipeline`` is the ``fmpipe`` command."""

from pipeline.cli import app

app(prog_name="fmpipe")
