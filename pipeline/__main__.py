"""``python -m pipeline`` is the ``fmpipe`` command (warm when a server is up: pipeline/warm.py)."""

from pipeline.launch import main

main()
