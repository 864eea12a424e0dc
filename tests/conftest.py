"""Test workers share the machine's cores: each worker's torch (and the processes it starts) gets its
share of the threads, so that two workers on two cores don't fight over four spinning threads."""
import os

MAX_WORKERS = 4   # more model-building workers than this buys little and costs memory


def _share_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        # set before torch is imported here, and inherited by the CLI and server processes tests start
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_cores()


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
