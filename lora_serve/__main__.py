"""``python -m lora_serve``: the ``lora-serve`` server (see ``lora_serve/cli.py``)."""

from .cli import main

main()
