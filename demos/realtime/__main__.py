"""`python -m demos.realtime [OPTIONS]` is `fastdiff demo [OPTIONS]`; `--help` lists the options."""

from fastdiff.cli import demo

demo(prog_name="python -m demos.realtime")
