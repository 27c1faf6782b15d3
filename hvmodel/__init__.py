"""hvmodel: a model of a bare-metal hypervisor's memory virtualization on real x86-64 code.

Public API::

    from hvmodel import Host, HostConfig, VMConfig, load_guest
    host = Host(HostConfig(memsize=256 << 20))
    vm = host.power_on(VMConfig(memsize=64 << 20), load_guest("guests/hello.asm"))
    result = vm.run()
"""

from .guest.image import GuestBuildError, GuestImage
from .guest.load import load_guest
from .host.host import AdmissionError, Host, HostConfig
from .vm.vm import VM, VMConfig, VMError, VMResult

__all__ = ["Host", "HostConfig", "VM", "VMConfig", "VMResult", "VMError", "AdmissionError",
           "GuestImage", "GuestBuildError", "load_guest"]
