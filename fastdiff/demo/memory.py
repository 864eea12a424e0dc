"""Give freed heap memory back to the system after sessions end.

Each session allocates its stream's buffers and tensors on the compute thread and frees them when
the client leaves. glibc keeps what was freed in its arenas for reuse, so under connection churn
(clients that come and go every second) the server's resident memory climbs although nothing is
leaked; ``malloc_trim`` returns it. Elsewhere (other C libraries) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

MIN_INTERVAL_S = 2.0  # a trim walks the heap (~10 ms on a 500 MB server): at most this often

_lock = threading.Lock()
_last = float("-inf")


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory(now: float | None = None) -> bool:
    """Return freed heap memory to the system, unless that was done under MIN_INTERVAL_S ago.
    True when a trim ran."""
    global _last
    now = time.monotonic() if now is None else now
    with _lock:
        if _TRIM is None or now - _last < MIN_INTERVAL_S:
            return False
        _last = now
    _TRIM(0)
    return True
