"""The round engine's parts, each with one job, handed their collaborators by
:class:`~pl_federated.module.FederatedModule` (none of them imports it back):

* :mod:`~pl_federated.engine.config`: the validated federation settings.
* :mod:`~pl_federated.engine.setup`: what ``setup`` prepares at every stage, and the Trainer
  settings fit changes and restores.
* :mod:`~pl_federated.engine.schedule`: named seed streams, client selection, rank ownership
  and the round's training slots.
* :mod:`~pl_federated.engine.collectives`: gather/reduce across processes (identity in one).
* :mod:`~pl_federated.engine.round_state`: per-round accumulators declared with their
  cross-rank merge.
* :mod:`~pl_federated.engine.workers`: the worker modules by role and their state.
* :mod:`~pl_federated.engine.transport`: what a client downloads, keeps and uploads.
* :mod:`~pl_federated.engine.communication`: the bytes of what it downloads and uploads.
* :mod:`~pl_federated.engine.dispatch`: calls the federated callbacks' hooks.
* :mod:`~pl_federated.engine.evaluation`: global and personal evaluation, test/validate.
* :mod:`~pl_federated.engine.round_log`: client logs, round rows, history, logger axes.

The loops that use them are in :mod:`pl_federated.loops`.
"""
