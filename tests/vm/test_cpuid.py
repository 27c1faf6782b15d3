"""CPUID is answered by the VMM: the documented model, only features the walker implements."""

from hvmodel.vm import cpuid as C


def test_vendor_and_brand():
    eax, ebx, ecx, edx = C.cpuid(0)
    assert eax == C.MAX_BASIC
    assert (ebx.to_bytes(4, "little") + edx.to_bytes(4, "little") + ecx.to_bytes(4, "little")) == b"GenuineIntel"
    brand = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004) for r in C.cpuid(leaf))
    assert brand.rstrip(b"\0") == C.BRAND.encode()
    _, b, c, d = C.cpuid(0x40000000)
    assert b"".join(x.to_bytes(4, "little") for x in (b, c, d)) == b"VMwareVMware"


def test_paging_features_match_the_walker():
    _, ebx, ecx, edx = C.cpuid(1)
    assert edx & C.PAE and edx & C.PSE and edx & C.APIC and edx & C.PGE
    assert ecx & (1 << 31)                       # running on a hypervisor
    assert not ecx & (1 << 17)                   # no PCID
    assert not ecx & (1 << 21) and not ecx & (1 << 24)   # no x2APIC, no TSC-deadline
    _, b7, c7, _ = C.cpuid(7, 0)
    assert b7 & C.SMEP and b7 & C.SMAP and not c7 & (1 << 3) and not c7 & (1 << 16)   # no PKU, no LA57
    _, _, _, e1 = C.cpuid(0x80000001)
    assert e1 & C.NX and e1 & C.PDPE1GB and e1 & C.LM
    assert C.cpuid(0x80000008)[0] & 0xFF == 40


def test_out_of_range_leaves_answer_the_highest_basic_leaf():
    assert C.cpuid(0x1234) == C.cpuid(C.MAX_BASIC)
    assert C.cpuid(0x8000FFFF) == C.cpuid(C.MAX_BASIC)


def test_guest_cpuid_goes_through_the_vmm(run_guest_asm):
    src = ("mov eax, 0x80000008; cpuid; mov esi, eax; mov eax, 0x40000000; cpuid;"
           " cmp ebx, 0x61774d56; jne bad; mov eax, esi; out 0xf4, al; bad: mov al, 1; out 0xf4, al")
    vm, res = run_guest_asm(src)
    assert res.exit_status == 40
