"""One BLAS thread while the advisor fits and predicts.

The fits solve thousands of tiny least-squares problems (SVDs of matrices of
about 100 x 40). OpenBLAS splits even these across its threads, and on a
machine whose cores are busy the threads wait for each other: measured on 2
shared cores, 200 such SVDs took 8 s with OpenBLAS's default threads against
0.09 s with one, and ``Advisor.fit()`` 17.7 s against 5.0 s. The results are
the same; only the waiting goes.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def one_blas_thread(function: F) -> F:
    """Runs ``function`` with BLAS (OpenBLAS, MKL, ...) limited to one thread
    (threadpoolctl, a dependency of scikit-learn); the previous limits are
    restored afterwards."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        with threadpool_limits(limits=1, user_api="blas"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
