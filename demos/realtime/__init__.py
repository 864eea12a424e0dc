"""`python -m demos.realtime`: the real-time demo app; the same as `fastdiff demo`.

The server and its page live in :mod:`fastdiff.demo`, so that `fastdiff demo` also works from an
installed package; this is the entry point for a checkout.
"""
