"""LitServe's batched loop with a blocking wait for the first request of a batch (`WaitingBatchedLoop`), shared by
the single-model and the multi-adapter `serve`."""

from __future__ import annotations

from queue import Empty

__all__ = ["batched_loop"]


class _FirstThen:
    """A queue that hands out `first`, then what `queue` holds (the `get` / `get_nowait` that LitServe's collation
    uses)."""

    def __init__(self, first, queue) -> None:
        self.first, self.queue = [first], queue

    def get(self, block: bool = True, timeout: float | None = None):
        return self.first.pop() if self.first else self.queue.get(block, timeout)

    def get_nowait(self):
        return self.get(False)


try:  # LitServe's batched loop and its collation, to wait instead of polling (`WaitingBatchedLoop`)
    from litserve.loops.base import collate_requests
    from litserve.loops.simple_loops import BatchedLoop
except ImportError:  # another LitServe layout: its own loop is used
    BatchedLoop = None

if BatchedLoop is not None:

    class WaitingBatchedLoop(BatchedLoop):
        """LitServe's batched loop, except that an idle worker waits in a blocking `get` for the first request of a
        batch.

        LitServe's own loop polls its queue every millisecond while no request is there, which keeps taking CPU from
        the HTTP process on a small machine (docs/deployment.md, "Batching"). The batch window (`batch_timeout`) starts
        when the first request arrives, as before.
        """

        def get_batch_requests(self, lit_api, request_queue, transport):
            try:
                first = request_queue.get(timeout=1.0)
            except Empty:
                return [], []
            return collate_requests(self, lit_api, _FirstThen(first, request_queue), transport)


def batched_loop(max_batch_size: int):
    """The loop a LitAPI with this batch size runs: `WaitingBatchedLoop` where batching is on and LitServe has it."""
    return WaitingBatchedLoop() if BatchedLoop is not None and max_batch_size > 1 else "auto"
