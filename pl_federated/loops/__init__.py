"""The federation's loops, as Lightning splits its Trainer from its loops:

* :mod:`~pl_federated.loops.round_loop`: one communication round (= one Lightning epoch):
  start (selection, resets, hooks) and end (merge, aggregate, evaluate, log).
* :mod:`~pl_federated.loops.local_update`: one client's local update (the batch plan and the
  step routine shared with the vectorized path and callbacks' extra steps), its upload.
* :mod:`~pl_federated.loops.vectorized`: a group of clients' updates at once with ``vmap``.
"""
