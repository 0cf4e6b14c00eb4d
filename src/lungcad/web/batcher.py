"""Micro-batching: concurrent uploads share forward passes.

Worker threads each take the first waiting request, wait up to `max_wait` seconds for more (up to
`max_batch`), and run them together through `run_batch` (in the web app:
preparation and `Predictor.predict_prepared`, on images the request threads have already decoded).
On a CPU a batch of 4-16 images runs at several times the per-image rate of one-by-one calls, so
the server's throughput under load approaches the offline engine's batch rate, while a lone
request waits at most `max_wait` longer.

Why several workers with few threads each rather than one worker using every core: a forward pass
split over all cores waits at every layer for its slowest thread, so whenever a request thread
(decoding, PNG, database) preempts one of them the whole pass stalls. On 2 cores under load one
2-thread worker ran at half its offline rate; two 1-thread workers keep both cores on the model
(their offline rate is the same). `init_worker` runs first in each worker thread (torch's
intra-op thread count is per thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16, max_wait: float = 0.01,
                 workers: int = 1, init_worker: Callable[[], None] | None = None):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.init_worker = init_worker
        self._queue: queue.Queue[tuple[Any, Future]] = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name=f"lungcad-batcher-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, item: Any) -> Any:
        """The result for one item (blocks until its batch has run; re-raises the batch's exception)."""
        future: Future = Future()
        self._queue.put((item, future))
        return future.result()

    def _loop(self) -> None:
        if self.init_worker is not None:
            try:
                self.init_worker()
            except Exception:  # a worker that died here would leave its requests waiting forever
                log.exception("inference worker set-up failed; the worker runs with the defaults")
        while True:
            batch = [self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                results = self.run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
            except Exception as exc:
                if len(batch) == 1:  # delivered to the waiting request, which turns it into a 500 page
                    log.exception("batch prediction failed")
                    batch[0][1].set_exception(exc)
                    continue
                # one item's failure must not fail the others batched with it (another upload's
                # files, or the other slices of a series): run them one by one
                log.warning("batch of %d failed (%s: %s); running its items one by one", len(batch),
                            type(exc).__name__, exc)
                for item, future in batch:
                    try:
                        (result,) = self.run_batch([item])
                    except Exception as one:
                        log.exception("batch prediction failed")
                        future.set_exception(one)
                    else:
                        future.set_result(result)
                continue
            for (_, future), result in zip(batch, results):
                future.set_result(result)
