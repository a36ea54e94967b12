"""The input pipeline off the critical path: `prefetch(make_batch, steps)` builds the batches of the coming steps
in background threads while the current step trains, and yields (step, batch) in step order.

    with prefetch(make_batch, range(start, steps), depth=2, workers=2, pin_memory=True) as batches:
        for step, batch in batches:
            batch = to_device(batch, device)   # asynchronous when pinned; T5 features cast to float32 there
            ...

make_batch(step) must be a pure function of the step (the trainer's: FeatureDataset.batch of batch_indices(seed,
step)), so a prefetched run takes exactly the batches of a synchronous one, and a resumed run those of an
uninterrupted one. Threads, not processes: the work that counts (file reads into the batch's tensors, torch
copies) releases the GIL, nothing is pickled, and resuming needs no worker state.

Failure and shutdown: an exception in make_batch(s) is raised in the consumer when it reaches step s (the batches
before it are yielded first); leaving the loop (break, an exception, the end, `close()`, the `with` block's end,
the iterator being garbage-collected) cancels the batches not started and waits for those being built, so no
thread outlives it.
"""
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass, replace

import torch

THREAD_NAME = "pixart_fast-prefetch"  # the worker threads' name prefix


def pin(obj):
    """obj with its CPU tensors in page-locked memory (needs CUDA; tensors already pinned are kept as they are):
    a tensor, a dataclass's tensor fields (pixart_fast.batch.Batch), or the tensors in a dict, list or tuple."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type != "cpu" or obj.is_pinned() else obj.pin_memory()
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: pin(getattr(obj, f.name)) for f in fields(obj)
                               if f.init and isinstance(getattr(obj, f.name), torch.Tensor)})
    if isinstance(obj, dict):
        return {k: pin(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(pin(v) for v in obj)
    return obj


def to_device(batch, device, text_dtype: torch.dtype | None = torch.float32):
    """A Batch on `device`, ready for the model: tensors moved (asynchronously from pinned memory), caption
    features cast to text_dtype there (T5 features stored as bfloat16 travel as bfloat16: half the bytes; the
    model's caption projection takes the float32 it took before; None: leave them as they come)."""
    moved = batch.to(device, non_blocking=True)
    if text_dtype is not None and moved.text is not None and moved.text.dtype != text_dtype:
        moved = replace(moved, text=moved.text.to(text_dtype))
    return moved


def _build(make_batch, step, pin_memory: bool):
    batch = make_batch(step)
    return pin(batch) if pin_memory else batch


class Prefetcher:
    """Iterator of (step, make_batch(step)) over `steps`, in order, computed ahead by worker threads. Made by
    `prefetch`; a context manager whose exit (like `close()`) stops and joins its threads."""

    def __init__(self, make_batch, steps, depth: int = 2, workers: int = 1, pin_memory: bool = False):
        if depth < 1 or workers < 1:
            raise ValueError(f"prefetch needs depth >= 1 and workers >= 1, got depth={depth}, workers={workers}")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("prefetch(pin_memory=True): no CUDA here, so nothing is pinned", stacklevel=3)
            pin_memory = False
        self._make, self._steps, self._depth, self._pin = make_batch, iter(steps), depth, pin_memory
        self._pending = deque()  # (step, future), in step order
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=THREAD_NAME)
        self._closed = False
        try:
            self._fill()
        except BaseException:
            self.close()
            raise

    def _fill(self) -> None:
        """Keep `depth` batches queued, being built or built, beyond the one the consumer holds."""
        while len(self._pending) < self._depth:
            try:
                step = next(self._steps)
            except StopIteration:
                return
            # _build is no method: a queued batch must not keep the Prefetcher alive (its garbage collection
            # is what stops the threads of a loop left without close())
            self._pending.append((step, self._pool.submit(_build, self._make, step, self._pin)))

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed or not self._pending:
            self.close()
            raise StopIteration
        step, future = self._pending.popleft()
        try:
            self._fill()
            batch = future.result()  # make_batch's exception, raised here at its step
        except BaseException:
            self.close()
            raise
        return step, batch

    def close(self) -> None:
        """Cancel the batches not started, wait for those being built, end the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


def prefetch(make_batch, steps, depth: int = 2, workers: int = 1, pin_memory: bool = False) -> Prefetcher:
    """(step, make_batch(step)) for each step of `steps` (any iterable, e.g. range(start, total)), in order,
    with the `depth` batches after the one being consumed built ahead by `workers` threads (workers <= depth:
    more would idle). pin_memory: put the batches' tensors in page-locked
    memory (when CUDA is available; tensors make_batch already pinned are kept), so `.to(device,
    non_blocking=True)` copies asynchronously. Use it in a `with` block or run it to the end: see the module
    docstring for exceptions and shutdown."""
    return Prefetcher(make_batch, steps, depth, workers, pin_memory)
