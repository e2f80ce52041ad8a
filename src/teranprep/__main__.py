"""`python -m teranprep` is `prep`."""

from teranprep.cli import main

main()
