"""PCI config ports answer "no device"; the Bochs shutdown port; port 0x80 and unknown ports counted."""

from hvmodel.devices.bus import IOBus
from hvmodel.devices.pci import PciHostNoDevices
from hvmodel.devices.shutdown import BochsShutdown


def test_pci_config_reads_no_device_and_latches_the_address():
    bus = IOBus()
    pci = PciHostNoDevices()
    bus.attach(pci)
    bus.write(0xCF8, 4, 0x8000_0000 | (3 << 11) | 0x0B)
    assert bus.read(0xCF8, 4) == 0x8000_1808        # register bits 1:0 read as zero
    assert bus.read(0xCFC, 4) == 0xFFFF_FFFF
    assert bus.read(0xCFE, 2) == 0xFFFF
    bus.write(0xCFC, 4, 0x1234)
    assert (pci.config_reads, pci.config_writes) == (2, 1)


def test_shutdown_needs_the_whole_string():
    calls = []
    bus = IOBus()
    bus.attach(BochsShutdown(lambda: calls.append(1)))
    for ch in b"Shutdow":
        bus.write(0x8900, 1, ch)
    assert not calls
    bus.write(0x8900, 1, ord("x"))
    for ch in b"SShutdown":
        bus.write(0x8900, 1, ch)
    assert calls == [1]


def test_guest_powers_off_through_0x8900(run_guest_asm):
    src = "mov dx, 0x8900\n" + "".join(f"mov al, {hex(c)}; out dx, al\n" for c in b"Shutdown") + "mov al, 9; out 0xf4, al"
    vm, res = run_guest_asm(src)
    assert res.exit_status == 0 and "Shutdown" in res.message


def test_port80_and_unknown_ports_are_counted(run_guest_asm):
    src = ("mov al, 1; out 0x80, al; out 0x80, al; mov dx, 0x1234; out dx, al; in al, dx; mov bl, al;"
           " mov al, bl; out 0xf4, al")
    vm, res = run_guest_asm(src)
    assert res.exit_status == 0xFF            # open bus reads all ones
    c = res.counters
    assert (c["io_port80_writes"], c["io_unknown_writes"], c["io_unknown_reads"]) == (2, 1, 1)
