"""QEMU's fw_cfg device, I/O-port interface: 0x510 selector, 0x511 data.

A guest writes a 16-bit key to the selector (which also rewinds the data
offset), then reads the item byte by byte from the data port; reading past the
end of an item, or an unknown key, reads 0 (QEMU does the same). Integers are
little-endian except the file directory, which is big-endian. No DMA interface
(FW_CFG_ID reports the traditional interface only); data-port writes are ignored,
as QEMU ignores them since 2.4.

Items (QEMU's key numbers, include/standard-headers/linux/qemu_fw_cfg.h):

====  ==================  ==========================================
key   name                value here
====  ==================  ==========================================
0x00  SIGNATURE           ``b"QEMU"``
0x01  ID                  1 (traditional I/O interface, no DMA)
0x02  UUID                the VM's UUID (16 bytes)
0x03  RAM_SIZE            guest memory in bytes (u64)
0x04  NOGRAPHIC           1 (u16: a serial console, no display)
0x05  NB_CPUS             1 (u16)
0x0e  BOOT_MENU           0 (u16)
0x0f  MAX_CPUS            1 (u16)
0x07  KERNEL_ADDR         a booted kernel's load address (u32)
0x08  KERNEL_SIZE         its size with BSS (u32)
0x10  KERNEL_ENTRY        its entry point (u32)
0x11  KERNEL_DATA         its bytes as loaded (BSS zeroed)
0x0a  INITRD_ADDR         the Multiboot info address (as QEMU sets it for Multiboot)
0x0b  INITRD_SIZE         88 (the info structure's size)
0x12  INITRD_DATA         the info structure
0x19  FILE_DIR            an empty directory (count 0, big-endian u32)
====  ==================  ==========================================
"""

from __future__ import annotations

import struct

FW_CFG_PORT_SEL = 0x510
FW_CFG_PORT_DATA = 0x511

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_KERNEL_ADDR = 0x07
FW_CFG_KERNEL_SIZE = 0x08
FW_CFG_INITRD_ADDR = 0x0A
FW_CFG_INITRD_SIZE = 0x0B
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_KERNEL_ENTRY = 0x10
FW_CFG_KERNEL_DATA = 0x11
FW_CFG_INITRD_DATA = 0x12
FW_CFG_FILE_DIR = 0x19


class FwCfg:
    """The fw_cfg items of one VM, readable through the two I/O ports."""

    ports = (FW_CFG_PORT_SEL, FW_CFG_PORT_DATA)

    def __init__(self, ram_size: int, uuid: bytes = bytes(16), cpus: int = 1) -> None:
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", 1),
            FW_CFG_UUID: uuid[:16].ljust(16, b"\0"),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_FILE_DIR: struct.pack(">I", 0),
        }
        self.key = 0
        self.offset = 0
        self.selects = 0

    def add_kernel(self, addr: int, entry: int, data: bytes, info_addr: int, info: bytes) -> None:
        """The items QEMU's Multiboot loader passes to its option ROM."""
        self.items[FW_CFG_KERNEL_ADDR] = struct.pack("<I", addr & 0xFFFFFFFF)
        self.items[FW_CFG_KERNEL_SIZE] = struct.pack("<I", len(data))
        self.items[FW_CFG_KERNEL_ENTRY] = struct.pack("<I", entry & 0xFFFFFFFF)
        self.items[FW_CFG_KERNEL_DATA] = bytes(data)
        self.items[FW_CFG_INITRD_ADDR] = struct.pack("<I", info_addr)
        self.items[FW_CFG_INITRD_SIZE] = struct.pack("<I", len(info))
        self.items[FW_CFG_INITRD_DATA] = bytes(info)

    def read(self, port: int, size: int) -> int:
        if port != FW_CFG_PORT_DATA:
            return 0  # the selector is write-only
        value = 0
        item = self.items.get(self.key, b"")
        for i in range(size):  # a wide read of the data port reads successive bytes
            if self.offset < len(item):
                value |= item[self.offset] << (8 * i)
                self.offset += 1
        return value

    def write(self, port: int, size: int, value: int) -> None:
        if port == FW_CFG_PORT_SEL:
            self.key = value & 0xFFFF if size >= 2 else value & 0xFF
            self.offset = 0
            self.selects += 1
