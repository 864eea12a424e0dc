"""`python -m fastdiff` runs the `fastdiff` command."""

from .cli import main

main(prog_name="fastdiff")
