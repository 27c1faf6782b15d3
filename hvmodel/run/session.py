"""Executing a run: :class:`Session` (armed faults, checkpoints, digests), :func:`execute`
(a run in this process, digested: what campaigns, replays and the pytest plugin use) and
:class:`Run` (one ``hvmodel run`` from its spec to its results: what the command drives).
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Callable

from ..inject import InjectError, Injector
from .build import build_host
from .digest import RunDigest, digest_vm, memory_digest
from .errors import EXIT_USAGE, RunError
from .spec import RunSpec, command

if TYPE_CHECKING:
    from ..host.host import Host
    from ..vm.vm import VMResult


class Session:
    """A built host, armed with the run's faults, recording checkpoints and early digests.

    :class:`Run` and :func:`execute` both use it::

        s = Session(host, faults, seed, argv)
        results = host.run(max_insns, on_round=s.on_round)
        digest = s.finish(results)
    """

    def __init__(self, host: "Host", faults: list, seed: int, argv: list[str], *, dry: bool = False) -> None:
        self.host = host
        self.argv = list(argv)
        self.dry = dry
        self.injector = Injector(faults, seed, dry=dry).attach(host) if faults else None
        self.checkpoints: list = []
        self._early: dict[int, tuple[str, list[str]]] = {}
        self._round = 0
        # A VM that stops while others run gives its memory back: digest it first.
        host.before_power_off.append(lambda vm: self._early.setdefault(vm.id, memory_digest(vm)))

    def on_round(self, host: "Host") -> None:
        """Host.run's per-round callback: one checkpoint (guest instructions and RIP per VM)."""
        self._round += 1
        self.checkpoints.append([self._round, [[vm.config.name, vm.vcpu.insns, vm.vcpu.rip]
                                               for vm in host.vms]])

    def finish(self, results: list["VMResult"] | None, error: str | None = None) -> RunDigest:
        """Disarm and digest every VM (call before ``host.close()``)."""
        fired = [f.as_dict() for f in self.injector.log] if self.injector is not None else []
        if self.injector is not None:
            self.injector.detach()
        vms = []
        for i, vm in enumerate(self.host.vms):
            r = results[i] if results is not None else None
            if r is None and vm.id in self.host.final:
                r = self.host.final[vm.id]
            vms.append(digest_vm(vm, r, self._early.get(vm.id)))
        return RunDigest(argv=self.argv, vms=vms, fired=fired, checkpoints=self.checkpoints,
                         error=error, dry=self.dry)


def execute(argv: list[str], *, dry: bool = False, images: dict | None = None,
            on_round: Callable | None = None) -> RunDigest:
    """Run ``hvmodel run ARGV`` in this process (no console output) and digest it.

    ``dry`` arms the faults' triggers without injecting (the reference run). A bad
    argument raises :class:`~hvmodel.run.errors.RunError`; an exception escaping the VMM
    is caught and kept, with its traceback, in ``RunDigest.error`` (a crash is an outcome).
    """
    spec = RunSpec.from_argv(argv)
    host = build_host(spec, images=images)
    try:
        try:
            session = Session(host, spec.faults, spec.seed_for(host.config.seed), argv, dry=dry)
        except Exception as e:
            raise RunError(str(e), EXIT_USAGE) from None

        def rounds(h: "Host") -> None:
            session.on_round(h)
            if on_round is not None:
                on_round(h)
        results, error = None, None
        try:
            results = host.run(spec.max_insns, on_round=rounds)
        except Exception:
            error = traceback.format_exc()
        try:
            return session.finish(results, error)
        except Exception:
            return RunDigest(argv=list(argv), error=(error or "") + traceback.format_exc(), dry=dry)
    finally:
        host.close()


class Run:
    """One ``hvmodel run``: its spec, its host (built), its session (when faults are armed or
    the run is recorded); :meth:`execute` runs it to its results. Close it (or use ``with``)
    once the results are reported: the host keeps the VMs' state until then.

    ``echo`` receives a single VM's console output as it is written.
    """

    def __init__(self, spec: RunSpec, *, echo: Callable[[bytes], None] | None = None) -> None:
        self.spec = spec
        self.port = spec.gdb_port()       # a bad --gdb is a usage error before anything starts
        self.images: dict | None = {} if spec.record else None
        self.host = build_host(spec, echo=echo, images=self.images)
        try:
            self.session = self._session()
        except BaseException:
            self.host.close()
            raise
        self.results: list["VMResult"] | None = None
        self.digest: RunDigest | None = None
        self.crash: str | None = None     # the traceback of a VMM crash under fault injection

    def _session(self) -> "Session | None":
        spec = self.spec
        if not (spec.faults or spec.record):
            return None
        try:
            return Session(self.host, spec.faults, spec.seed_for(self.host.config.seed), spec.argv or [])
        except InjectError as e:
            raise RunError(str(e), EXIT_USAGE) from None

    @property
    def command(self) -> str:
        """The one command that runs this run again."""
        return command(self.spec.argv or [])

    def execute(self, on_round: Callable[["Host"], None] | None = None) -> list["VMResult"] | None:
        """Run every VM to its end; None if the VMM crashed under fault injection (``crash``).

        ``on_round(host)`` is called after every host round (after the session's checkpoint).
        """
        spec, host, session = self.spec, self.host, self.session
        rounds = session.on_round if session is not None else None
        if on_round is not None:
            checkpoint = rounds

            def rounds(h: "Host") -> None:
                if checkpoint is not None:
                    checkpoint(h)
                on_round(h)
        try:
            results = self._gdb() if spec.gdb else host.run(spec.max_insns, on_round=rounds)
        except Exception:
            if session is None or not spec.faults:
                raise
            self.crash = traceback.format_exc()
            return None
        for vm, r in zip(host.vms, results):
            if vm.triple_fault_report:
                r.message = vm.triple_fault_report
        self.digest = session.finish(results) if session is not None else None
        if spec.record:
            from . import recording
            try:
                recording.write(spec.record, self.digest, self.images)
            except OSError as e:
                raise RunError(f"--record: cannot write {spec.record}: {e.strerror}", EXIT_USAGE) from None
        self.results = results
        return results

    def _gdb(self) -> list["VMResult"]:
        from ..debug.gdbstub import GdbStub, GdbStubError
        host = self.host
        if len(host.vms) != 1:
            raise RunError("--gdb debugs one VM: not with --vms or a scenario of several VMs", EXIT_USAGE)
        try:
            stub = GdbStub(host.vms[0], host, port=self.port, wait=self.spec.gdb_wait,
                           max_insns=self.spec.max_insns)
        except GdbStubError as e:
            raise RunError(str(e), EXIT_USAGE) from None
        stub.serve()
        return [host.vms[0].result()]

    def close(self) -> None:
        """Power the host off (frames back, swap files deleted)."""
        self.host.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Run", "RunDigest", "Session", "command", "digest_vm", "execute", "memory_digest"]
