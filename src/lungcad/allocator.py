"""Process-level performance set-up for the command line (not for library use).

PyTorch on CPU allocates and frees large activation buffers every step; glibc's malloc returns
them to the OS and page-faults them back in each time. jemalloc (or tcmalloc) keeps them: measured
on this project's 2-core build machine, full ResNet-50 fine-tuning went from 4.2 to 5.6 img/s.
An allocator can only be swapped before the process starts, so the `lungcad` command re-executes
itself once with LD_PRELOAD when a jemalloc library is installed (Debian: libjemalloc2) — the
approach of Intel's ipexrun launcher. Set LUNGCAD_MALLOC=system to opt out.

Only for the PyTorch-only jobs (train, evaluate): OpenVINO aborts ("free(): invalid size") when
jemalloc is preloaded, so prediction, export and the web app keep the system allocator.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
)
# Keep freed pages (no decay) and huge allocations in arenas: what PyTorch's CPU tuning guide uses.
COMMANDS = frozenset({"train", "evaluate"})  # where the preload is measured to help and known to be safe
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
MARKER = "LUNGCAD_MALLOC_PRELOADED"


def fast_allocator() -> str | None:
    for path in CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def reexec_with_fast_allocator(argv: list[str] | None = None) -> None:
    """Replace this process with itself under a preloaded jemalloc/tcmalloc, once; no-op otherwise."""
    if os.environ.get("LUNGCAD_MALLOC", "").lower() == "system" or os.environ.get(MARKER):
        return
    if sys.platform != "linux" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in COMMANDS:
        return
    lib = fast_allocator()
    if lib is None:
        return
    env = dict(os.environ)
    env[MARKER] = lib
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
    if "jemalloc" in lib:
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    try:
        os.execve(sys.executable, [sys.executable, "-m", "lungcad", *args], env)
    except OSError as exc:  # keep going with the system allocator rather than fail
        log.debug("could not re-exec with %s: %s", lib, exc)
