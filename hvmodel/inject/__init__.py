"""Fault injection: named faults armed by name, deterministic triggers, outcome classes.

* :mod:`hvmodel.inject.registry` — faults as values: parameters, specs in ``--fault``
  syntax, the registry and the :class:`~hvmodel.inject.registry.Fault` base class;
* :mod:`hvmodel.inject.faults` — the catalogue: every named fault, its parameters, where it
  acts and its documented expected outcome (docs/FAULTS.md lists them);
* :mod:`hvmodel.inject.arm` — when and where a fault fires (guest instruction N, the Kth
  event of a kind, probability p under a seed) and the :class:`Injector` that arms a host;
* the outcome of a faulty run (recovered, detected, visible — or a bug) is judged by
  :mod:`hvmodel.run.outcome`, against the run's dry reference.

Typical use::

    from hvmodel.inject import Injector, parse_fault
    inj = Injector([parse_fault("swap-read-error:nth=1")], seed=3)
    inj.attach(host)          # after the VMs are powered on
    host.run()
    print(inj.log)            # what fired, where, at which guest instruction
"""

from . import faults as _catalogue  # noqa: F401  (importing the catalogue registers every fault)
from .arm import Firing, Injector
from .registry import FAULTS, FaultSpec, InjectError, parse_fault

__all__ = ["FAULTS", "FaultSpec", "Firing", "InjectError", "Injector", "parse_fault"]
