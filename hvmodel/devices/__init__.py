"""The PC devices a VM is made of: the port bus, UART, PIT, PIC, CMOS, fw_cfg, PCI config ports,
debug-exit and shutdown ports, the local APIC, the VMware balloon back-door."""
