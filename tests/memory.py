"""Peak host-memory (RSS) growth of one call, measured in a fresh Python process.

Usage: `rss_growth_mib(setup="import torch; x = torch.randn(1000, 1000)", call="y = x @ x")`.
`setup` runs first (imports, input allocation, a warm-up call to load lazy libraries); the baseline is the
process's *current* RSS after it, and the result is the peak RSS (ru_maxrss) after `call` minus that
baseline. A transient peak inside `setup` above the baseline would inflate the result, so the measure errs
on the safe side for "grows memory by less than X" tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = """
import json, resource, sys
def _current_rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024
{setup}
_before = _current_rss_kib()
_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{call}
_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RSS_RESULT " + json.dumps({{"before_kib": _before, "peak_before_kib": _peak_before, "peak_kib": _peak}}))
"""


def rss_growth_mib(setup: str, call: str, *, env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """Peak RSS growth in MiB caused by running `call` after `setup` in a new interpreter (Linux only)."""
    script = _SCRIPT.format(setup=textwrap.dedent(setup), call=textwrap.dedent(call))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RSS_RESULT "))
    stats = json.loads(line[len("RSS_RESULT "):])
    return (stats["peak_kib"] - stats["before_kib"]) / 1024
