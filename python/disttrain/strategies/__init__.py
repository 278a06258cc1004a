"""Parallel-training approaches other than data-parallel training, each
measured against it (``disttrain bench strategies``):

- :mod:`disttrain.strategies.hogwild`: lock-free SGD on parameters in shared
  memory, several processes on one machine (Hogwild!, Niu et al. 2011).
- :mod:`disttrain.strategies.parameter_server`: one or more server ranks own the
  parameters and the optimizer; workers pull versioned parameters and push
  gradients (synchronous, bounded-staleness or asynchronous).
- :mod:`disttrain.strategies.mpi`: the mpi4py recipe (scatter files, broadcast
  parameters, all-reduce gradients) under ``mpiexec``, and a pipelined evaluation.

Each module is imported on demand: ``from disttrain.strategies import hogwild``.
"""
