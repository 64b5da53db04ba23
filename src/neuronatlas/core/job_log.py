"""A job's log: stdout, stderr and logging of a rule's script go to its log file, with timing and usage."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from neuronatlas import __version__


def process_usage() -> str:
    """This process's CPU seconds and peak RSS so far (start-up included), for the job log: how well it used its threads."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return f"process CPU {cpu:.1f}s, peak RSS {max(own.ru_maxrss, kids.ru_maxrss) / 1024:.0f} MB"


@contextlib.contextmanager
def logged(log_path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout/stderr (tqdm, prints, warnings) of a job to its log file; re-raise errors after logging."""
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh:
        old = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        handler = logging.StreamHandler(fh)
        logging.getLogger().addHandler(handler)
        t0 = time.perf_counter()
        try:
            print(f"neuronatlas {__version__}; pid {os.getpid()}; host {os.uname().nodename}", flush=True)
            yield
            print(f"done in {time.perf_counter() - t0:.1f}s; {process_usage()}", flush=True)
        except BaseException as exc:
            import traceback

            traceback.print_exc(file=fh)
            print(f"FAILED after {time.perf_counter() - t0:.1f}s: {type(exc).__name__}: {exc}", flush=True)
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            sys.stdout, sys.stderr = old
