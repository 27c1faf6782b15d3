"""VM exits as values: what stopped a vCPU's slice, handed to one dispatcher."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ExitReason(Enum):
    SLICE_END = "slice_end"        # the instruction budget ran out
    HLT = "hlt"                    # the guest executed hlt
    EXCEPTION = "exception"        # a guest exception to deliver through the IDT
    POWER_OFF = "power_off"        # debug-exit write, `cli; hlt`, shutdown port
    TRIPLE_FAULT = "triple_fault"  # an exception while delivering #DF
    BLOCKED = "blocked"            # an allocation must wait (host state low); the instruction restarts
    ERROR = "error"                # the VMM cannot continue (host OOM, engine trouble)


@dataclass
class VmExit:
    """One exit. Exception exits carry the vector, error code and CR2."""

    reason: ExitReason
    vector: int | None = None
    error_code: int | None = None
    cr2: int | None = None
    soft: bool = False          # `int N`: RIP already points past the instruction
    status: int | None = None   # POWER_OFF exit status
    message: str = ""


# Exception vectors (Intel SDM vol. 3 table 6-1).
DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS, GP, PF, MF, AC, MC, XM, VE, CP = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21)
VECTORS_WITH_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, AC, CP})
CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP, CP})
# Fault-class exceptions (their frame has the faulting RIP and RF = 1); #DB may be a
# fault or a trap and never sets RF.
FAULT_VECTORS = frozenset({DE, BR, UD, NM, TS, NP, SS, GP, PF, MF, AC, XM, VE, CP})
VECTOR_NAMES = {DE: "#DE", DB: "#DB", NMI: "NMI", BP: "#BP", OF: "#OF", BR: "#BR", UD: "#UD",
                NM: "#NM", DF: "#DF", TS: "#TS", NP: "#NP", SS: "#SS", GP: "#GP", PF: "#PF",
                MF: "#MF", AC: "#AC", MC: "#MC", XM: "#XM", VE: "#VE", CP: "#CP"}


def vector_name(v: int) -> str:
    """``#PF`` for 14, ``int 0x80`` style for others."""
    return VECTOR_NAMES.get(v, f"vector {v:#x}")
