"""Blobs move a few at a time: `run_all` runs jobs in a thread pool and
stops them all at the first failure or Ctrl-C."""

from __future__ import annotations

import concurrent.futures

# How often the waiting (main) thread wakes: Ctrl-C is seen this soon.
_POLL_SECONDS = 0.5


def run_all(jobs, workers: int, cancel) -> list:
    """Run the callables `jobs`, at most `workers` at once; their results in
    order. The first failure (or a KeyboardInterrupt in the waiting thread)
    calls `cancel()`, which must make the running jobs return soon, waits for
    them, and is raised."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))))
    futures = [pool.submit(job) for job in jobs]
    try:
        pending = set(futures)
        while pending:
            done, pending = concurrent.futures.wait(pending, timeout=_POLL_SECONDS,
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
    except BaseException:
        cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [f.result() for f in futures]
