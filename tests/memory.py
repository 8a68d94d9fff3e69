"""Peak host-memory growth of one call, measured in a fresh Python process.

Usage: `rss_growth_mib(setup="import torch; x = torch.randn(1000, 1000)", call="y = x @ x")`.
`setup` runs first (imports, input allocation, a warm-up call to load lazy libraries). The result is the
peak *anonymous* resident memory (RssAnon: heap and mmap'd buffers, what tensors use) while `call` runs,
minus its value just before. File-backed pages are left out on purpose: under memory pressure the kernel
evicts pages of the (multi-GB) torch libraries and faults them back in during the call, which made a plain
RSS/ru_maxrss measure report gigabytes of "growth" that no allocation caused. The peak is sampled every
millisecond by a thread (torch ops release the GIL); the buffers that matter live far longer than that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = """
import json, threading, time

def _anon_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

{setup}
_before = _anon_kib()
_peak = [_before]
_done = threading.Event()

def _sample():
    while not _done.is_set():
        _peak[0] = max(_peak[0], _anon_kib())
        time.sleep(0.001)

_sampler = threading.Thread(target=_sample, daemon=True)
_sampler.start()
{call}
_done.set()
_sampler.join()
_peak[0] = max(_peak[0], _anon_kib())
print("RSS_RESULT " + json.dumps({{"before_kib": _before, "peak_kib": _peak[0]}}))
"""


def rss_growth_mib(setup: str, call: str, *, env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """Peak anonymous-memory growth in MiB caused by running `call` after `setup` in a new interpreter
    (Linux only)."""
    script = _SCRIPT.format(setup=textwrap.dedent(setup), call=textwrap.dedent(call))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RSS_RESULT "))
    stats = json.loads(line[len("RSS_RESULT "):])
    return (stats["peak_kib"] - stats["before_kib"]) / 1024
