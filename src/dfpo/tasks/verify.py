"""Symbolic answer checking with math-verify under a process-level timeout.

math-verify's own timeout uses ``signal.alarm``, which only works in a process's main thread, and some inputs make
sympy run for minutes (``2^{2^{2^{2^5}}}``). So the check runs in a worker process with math-verify's timeouts
disabled, and the caller waits at most ``timeout`` seconds; a worker that overruns is killed and replaced. This works
from any thread. Timeouts and failures raise :class:`VerifierError`, which scorers count and log: a verifier
problem is never a silent zero.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool


class VerifierError(RuntimeError):
    """The verifier could not decide (timeout, crash, or parse failure of the gold answer)."""


def _verify_in_worker(gold: str, answer: str) -> bool:
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call with timeouts disabled
    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    answer_parsed = parse(_as_latex(answer), parsing_timeout=None)
    return bool(answer_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=None)


def _import_in_worker() -> None:
    import math_verify  # noqa: F401  (the first import of sympy takes seconds)


def _as_latex(text: str) -> str:
    text = text.strip()
    return text if text.startswith("$") or "\\boxed" in text else f"${text}$"


class MathVerifier:
    """``verifier(gold, answer) -> bool``: mathematical equivalence of two final answers (LaTeX or plain).

    One worker process is started on first use and reused; it is replaced after a timeout or crash. Starting it
    (spawning Python and importing sympy) is bounded by ``startup_timeout``, not by ``timeout``.
    """

    def __init__(self, timeout: float = 10.0, startup_timeout: float = 300.0) -> None:
        self.timeout, self.startup_timeout = timeout, startup_timeout
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a forked copy of a process that holds torch's thread pools can deadlock.
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            try:
                self._pool.submit(_import_in_worker).result(timeout=self.startup_timeout)
            except Exception as error:
                self._kill()
                raise VerifierError(f"the math-verify worker did not start: {error!r}") from error
        return self._pool

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, gold: str, answer: str) -> bool:
        with self._lock:  # one check at a time through the single worker
            future = self._executor().submit(_verify_in_worker, gold, answer)
            try:
                return future.result(timeout=self.timeout)
            except FutureTimeout:
                self._kill()
                raise VerifierError(
                    f"math-verify took over {self.timeout:g}s on answer {answer[:80]!r} (gold {gold[:80]!r})"
                ) from None
            except BrokenProcessPool as error:
                self._kill()
                raise VerifierError(f"the math-verify worker died on answer {answer[:80]!r}") from error
            except Exception as error:  # raised inside the check: the worker itself is fine
                raise VerifierError(f"math-verify failed on answer {answer[:80]!r}: {error}") from error

    def close(self) -> None:
        """Stop the worker process."""
        with self._lock:
            self._kill()
