"""A run as library code: its specification, building its host, executing and digesting it,
judging it against its reference, recording and replaying it, campaigns of many runs.

* :mod:`hvmodel.run.spec` — :class:`RunSpec`, a run as a value; its serialised form is the
  ``hvmodel run`` argument list (:meth:`RunSpec.from_argv`, :meth:`RunSpec.to_argv`);
* :mod:`hvmodel.run.build` — :func:`build_host`: the host and VMs a spec describes;
* :mod:`hvmodel.run.session` — :class:`Session` (armed faults, checkpoints, digests) and
  :func:`execute`; :class:`Run`, one ``hvmodel run`` from start to digest;
* :mod:`hvmodel.run.digest` — what comparisons need of a finished run;
* :mod:`hvmodel.run.outcome` — a faulty run against its dry reference;
* :mod:`hvmodel.run.replay` — ``--record`` and ``hvmodel replay``;
* :mod:`hvmodel.run.campaign` — ``hvmodel campaign``.
"""
