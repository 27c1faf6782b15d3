"""The host: the machine pool and its VMs, their scheduling, the memory policy, scenario files.

* :mod:`hvmodel.host.host` — :class:`Host` and :class:`HostConfig`: admission, round-robin
  scheduling in quanta, the memory policy between slices (sampling, targets, sharing,
  ballooning, compression and swapping by host memory state), reclaim when an allocation
  fails, damaged shared memory;
* :mod:`hvmodel.host.scenario` — TOML scenario files with ESXi's setting names.
"""

from .host import DEFAULT_HOST_MEM, AdmissionError, Host, HostConfig

__all__ = ["DEFAULT_HOST_MEM", "AdmissionError", "Host", "HostConfig"]
