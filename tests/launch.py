"""Start the worker processes of multi-process tests from a preloaded fork server.

`torch.multiprocessing.spawn` starts every worker as a fresh interpreter that imports torch, transformers
and moeplug again: measured on a loaded 2-core machine, 4 workers took 72 s to start (import only), the
same 4 from a fork server that preloaded those modules 1 s (28 s once, to start the server). A test
session starts ~25 such groups, so this is most of the suite's wall time.

The server is the standard library's forkserver: it imports the preload list once (no torch op runs in
it, so no OpenMP pool is forked) and forks a clean child per worker; workers are pickled by reference as
with `mp.spawn` (module-level functions), and each child still calls `init_process_group` itself. Children
inherit the environment the server started with, so workers set what they need (MASTER_PORT...) from
their arguments, as they already do.
"""

from __future__ import annotations

import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "transformers", "moeplug", "moeplug.tiny"]
_context = None


def spawn(worker, nprocs: int, args: tuple = ()) -> None:
    """`mp.spawn(worker, args=args, nprocs=nprocs, join=True)`, from a preloaded fork server."""
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    mp.start_processes(worker, args=args, nprocs=nprocs, join=True, start_method="forkserver")
