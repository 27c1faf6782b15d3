"""The host and VMs a :class:`~hvmodel.run.spec.RunSpec` describes.

A target ending in ``.toml`` is a scenario file (hvmodel/host/scenario.py): its host and
VMs, with the spec's host options overriding the scenario's; anything else is a guest
image, run as ``--vms`` copies on a host of ``--host-mem``. Bad input is a
:class:`~hvmodel.run.errors.RunError` with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..guest.image import GuestBuildError, GuestImage
from ..guest.load import load_guest
from ..host import scenario
from ..host.host import DEFAULT_HOST_MEM, Host, HostConfig
from ..vm.vm import VMConfig, VMError
from .errors import EXIT_USAGE, RunError
from .spec import RunSpec


def host_config(spec: RunSpec, base: HostConfig | None = None) -> HostConfig:
    """The host configuration from a scenario's (``base``) and the spec's overrides."""
    cfg = base or HostConfig(memsize=spec.host_mem if spec.host_mem is not None else DEFAULT_HOST_MEM)
    if base is not None and spec.host_mem is not None:
        cfg.memsize = spec.host_mem
    if spec.swap_dir:
        cfg.swap_dir = Path(spec.swap_dir)
    if spec.no_swap:
        cfg.swap = False
    if spec.swap_policy:
        cfg.swap_policy = spec.swap_policy
    if spec.no_large_pages:
        cfg.large_pages = False
    if spec.share_scan_time is not None:
        cfg.sharing.scan_time_min = spec.share_scan_time
    if spec.share_rate_max is not None:
        cfg.sharing.rate_max = spec.share_rate_max
    if spec.salt is not None:
        cfg.sharing.force_salting = 1
    if spec.seed is not None:
        cfg.seed = spec.seed
    return cfg


def load_image(path: Path, spec: RunSpec) -> GuestImage:
    """The guest image at ``path`` with the spec's kernel options (bad input: RunError, status 2)."""
    try:
        return load_guest(path, append=spec.append, modules=spec.module_list())
    except GuestBuildError as e:
        raise RunError(str(e), EXIT_USAGE) from None


def build_host(spec: RunSpec, *, echo: Callable[[bytes], None] | None = None,
               images: dict | None = None) -> Host:
    """Power on the VMs of a scenario file, or ``spec.vms`` copies of one guest.

    ``echo`` receives a single VM's console output as it is written. ``images`` (guest
    path -> GuestImage) is used and filled as the image cache: a recording keeps the
    images a run used, a replay hands them back.
    """
    target = Path(spec.target)
    if target.suffix == ".toml":
        try:
            base, specs = scenario.load(target)
        except scenario.ScenarioError as e:
            raise RunError(str(e), EXIT_USAGE) from None
        cfg = host_config(spec, base)
    else:
        cfg = host_config(spec)
        specs = [scenario.VMSpec(VMConfig(name=target.stem if spec.vms == 1 else f"{target.stem}-{i + 1}",
                                          memsize=spec.mem, mmu=spec.mmu, pshare_salt=spec.salt), target)
                 for i in range(spec.vms)]
    if images is None:
        images = {}
    try:
        host = Host(cfg)
    except VMError as e:
        raise RunError(str(e), EXIT_USAGE) from None
    try:
        for i, vm_spec in enumerate(specs):
            if vm_spec.guest not in images:
                images[vm_spec.guest] = load_image(vm_spec.guest, spec)
            if len(specs) > 1:
                vm_spec.config.guest_arg = i + 1
            elif echo is not None:
                vm_spec.config.echo = echo
            host.power_on(vm_spec.config, images[vm_spec.guest])
    except VMError as e:
        host.close()
        raise RunError(str(e), EXIT_USAGE) from None
    except BaseException:
        host.close()
        raise
    return host


__all__ = ["build_host", "host_config", "load_image"]
