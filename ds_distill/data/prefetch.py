"""Micro-batches prepared off the training thread: a background thread draws them ahead of the step, into pinned memory.

``Prefetcher`` wraps any batch stream (``__next__`` -> ``data.Batch``, ``state_dict()`` / ``load_state_dict()``,
e.g. ``data.BatchStream``) and is itself one, so the training loop does not change (``--prefetch_batches N``).
Why: on a GPU the step's host-to-device copies (``.to(device, non_blocking=True)``) only overlap with compute when
the source is pinned (page-locked) memory, and the collation of the next micro-batches can run while the device
works. Pinning is done only when an accelerator is present (on CPU there is no copy to overlap).

Exact resume: the producer thread records the wrapped stream's ``state_dict()`` right after drawing each batch and
queues it with the batch; ``state_dict()`` returns the state queued with the last batch the trainer CONSUMED, not
the producer's state (which is up to N batches ahead). It is the wrapped stream's own state dict, unchanged, so a
checkpoint saved with prefetching resumes without it and vice versa. Only the wrapped stream's
``state_dict`` / ``load_state_dict`` are called; its fields are never read: each ``Batch`` carries its own epoch and
position, so readers of the data position (the example tracker) need nothing from the stream.

A thread rather than DataLoader worker processes: the examples are tokenised ahead (``datasets``), so collation is
a few tensor copies per micro-batch that release the GIL; workers would pickle every batch between processes.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any

from ds_distill.data.batching import Batch
from ds_distill.runtime.callbacks import Callback


class Prefetcher:
    """Up to ``depth`` micro-batches drawn ahead of the trainer by a daemon thread.

    Args:
        stream: the wrapped batch stream (iterator of ``data.Batch`` with ``state_dict`` / ``load_state_dict``).
        depth: micro-batches held ready (>= 1).
        pin: copy each tensor into pinned host memory (``Tensor.pin_memory``), for asynchronous host-to-device copies.
    Errors raised by the wrapped stream in the thread are raised again by ``__next__`` in the trainer's thread.
    """

    def __init__(self, stream, depth: int, *, pin: bool):
        if depth < 1:
            raise ValueError(f"depth {depth} must be >= 1")
        self.stream, self.depth, self.pin = stream, depth, pin
        self.dataset = getattr(stream, "dataset", None)  # what the run's manifest fingerprints
        self._state = copy.deepcopy(stream.state_dict())  # the wrapped stream's state after the last consumed batch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._start()
        batch, state, error = self._queue.get()
        if error is not None:
            self.close()
            raise error
        self._state = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped stream's state dict as of the last batch returned by ``__next__`` (a copy)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Drop the batches drawn ahead and move the wrapped stream to ``state``; drawing restarts on the next batch."""
        self.close()
        self.stream.load_state_dict(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        """Stop the thread and drop what it drew ahead (the wrapped stream is then ahead of ``state_dict()``)."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a producer waiting for room in the queue
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None
        self._queue = queue.Queue(maxsize=self.depth)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(self._stop, self._queue), name="ds_distill-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                batch = next(self.stream)
                state = copy.deepcopy(self.stream.state_dict())  # taken before the next draw: this batch's position
                if self.pin:
                    batch = batch.pin_memory()
                item = (batch, state, None)
            except Exception as exc:  # handed to the trainer's thread, which raises it
                item = (None, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return


class ClosePrefetcher(Callback):
    """Stops the prefetch thread when the run is over, an error included (it would otherwise wait, daemon, until the
    process exits)."""

    def __init__(self, prefetcher: Prefetcher):
        self.prefetcher = prefetcher

    def on_exit(self, trainer) -> None:
        self.prefetcher.close()
