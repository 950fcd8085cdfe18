"""Metrics and health endpoints of a running node (Prometheus ``/metrics``, ``/healthz``, ``/readyz``).

Two halves on two levels of the node's layering (see ``[tool.importlinter]``):

- :mod:`node.observability.metrics` sits low, beside the database models: the event counters and
  histograms, and one-line recording functions that the SCP, the worker and the sender call.
- :mod:`node.observability.collector`, :mod:`~node.observability.health` and
  :mod:`~node.observability.server` sit just below :mod:`node.service`, which starts them: they
  read the database at scrape time and serve HTTP.

Nothing exposed carries patient data: no patient IDs, no UIDs, no AE titles, no exception texts.
"""
