"""`python -m moeplug.placement`: see `moeplug.placement.cli`."""

from .cli import main

main()
