"""Work spread over spawned single-threaded worker processes, each holding one object built once.

Used by the evaluate stage (one :class:`~pipeline.evaluation.Evaluator` per worker) and the TMPQ-DM
search (one :class:`~pipeline.search.Scorer` per worker). Every worker runs with one intra-op thread,
as the calling stage does, so a result does not depend on the worker count or the core count; with
``n <= 1`` the calls run in this process on ``local()`` instead.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

_OBJECT: Any = None
_INIT_ERROR: Optional[BaseException] = None


def _init(factory: Callable, args: tuple, kwargs: dict) -> None:
    import torch

    global _OBJECT, _INIT_ERROR
    torch.set_num_threads(1)
    try:
        _OBJECT = factory(*args, **kwargs)
    except Exception as exc:  # raised by the first call: a failing initializer would be respawned forever
        _INIT_ERROR = exc


def _call(job: tuple) -> Any:
    if _INIT_ERROR is not None:
        raise RuntimeError(f"a worker process could not start: {type(_INIT_ERROR).__name__}: {_INIT_ERROR}") \
            from _INIT_ERROR
    method, args = job
    return getattr(_OBJECT, method)(*args)


class WorkerPool:
    """``n`` spawned processes, each with its own ``factory(*args, **kwargs)`` (built once, in the worker).

    :meth:`imap` calls one method of that object per item and yields the results in item order.
    ``local``: returns the object to use in this process when ``n <= 1`` (called lazily, so nothing is
    built when nothing is scored). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, n: int, factory: Callable, args: tuple = (), kwargs: Optional[dict] = None,
                 local: Optional[Callable[[], Any]] = None) -> None:
        if n < 1:
            raise ValueError(f"n_workers: must be >= 1, got {n}")
        self.local, self.pool = local, None
        if n > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(n, initializer=_init, initargs=(factory, args, kwargs or {}))
        elif local is None:
            raise ValueError("WorkerPool: one worker runs in this process and needs local")

    def imap(self, method: str, items: Iterable[tuple]) -> Iterator[Any]:
        """``getattr(obj, method)(*item)`` for every item (a tuple of arguments), in order."""
        if self.pool is None:
            obj = self.local()
            for item in items:
                yield getattr(obj, method)(*item)
            return
        yield from self.pool.imap(_call, [(method, tuple(item)) for item in items], chunksize=1)

    def map(self, method: str, items: Iterable[tuple]) -> list:
        return list(self.imap(method, items))

    def close(self) -> None:
        """Stop the workers. Always by ``Pool.terminate``: every result the caller wanted has been read by
        then, and ``Pool.close`` + ``join`` can wait forever when a task's result never arrives (seen once
        in the tests: two exited workers never reaped)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
