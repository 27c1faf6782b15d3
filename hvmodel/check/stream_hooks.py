"""The compiled memory-access hooks of a check run (numba cfuncs registered with Unicorn).

A Python callback per guest load and store costs about 1 µs on its own (measured on
2.1.4: 1,000,000 accesses take 0.05 s with no hook, 0.09 s with a compiled hook that
records each, 0.89 s with a Python one that appends each to a list), and a check makes
three per access. So the common case runs compiled: the reference's hook appends a
record to a buffer, a mode's hook compares its access with the reference's record and
the p2m's arrays; anything else -- a full buffer, an access that is not plainly right --
calls back into Python (``slow``, a raw ctypes callback whose address is in the context),
which decides, grows, or records the divergence.

Each hook's user data is a context array of int64 (the slots below); arrays are reached by
address (numba freezes a numpy array captured as a global into a copy).
"""

from __future__ import annotations

from llvmlite import ir
from numba import carray, cfunc, types
from numba.extending import intrinsic

# Context slots, shared by both hooks.
C_BUF = 0       # address of the int64 record buffer (5 per access)
C_CAP = 1       # records the buffer holds (reference) / records to check (mode)
C_POS = 2       # records written (reference) / accesses seen (mode)
C_COUNTER = 3   # address of Unicorn's instruction counter of the slice (u64 in uc_struct)
C_BASE = 4      # the vCPU's instructions before the slice
C_SLOW = 5      # address of the Python callback for everything else
C_DONE = 6      # mode: 1 once a divergence is recorded (nothing more is checked)
C_STATE = 7     # mode: address of the p2m's state array (uint8)
C_FRAME = 8     # mode: address of the p2m's value array (int64)
C_NPAGES = 9    # mode: guest pages
CTX_SLOTS = 10
RECORD = 5      # instruction number, kind, address, size, value

_WRITE = 17     # UC_MEM_WRITE (reads arrive as UC_MEM_READ_AFTER, 25)
_UNBACKED, _PRIVATE, _SHARED = 0, 1, 2   # P2MState values (checked against the enum in stream.py)


@intrinsic
def _i64p(typingctx, addr):
    sig = types.CPointer(types.int64)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
    return sig, codegen


@intrinsic
def _u8p(typingctx, addr):
    sig = types.CPointer(types.uint8)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.uint8)))
    return sig, codegen


@intrinsic
def _call(typingctx, fn, uc, kind, addr, size, value, ctx):
    """Call the C function at address ``fn`` with a memory hook's arguments."""
    sig = types.void(types.int64, types.voidptr, types.int32, types.int64, types.int32, types.int64,
                     types.CPointer(types.int64))

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64),
                                               ir.IntType(32), ir.IntType(64), ir.IntType(64).as_pointer()])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()
    return sig, codegen


# uc_cb_hookmem_t: (uc, type, address, size, value, user_data); the address is declared
# signed: physical addresses are below 2^63, and records are int64.
SIGNATURE = types.void(types.voidptr, types.int32, types.int64, types.int32, types.int64,
                       types.CPointer(types.int64))


@cfunc(SIGNATURE, nopython=True, cache=True)
def record_access(uc, kind, addr, size, value, ctx):
    """The reference: append (instruction, kind, guest-physical address, size, value)."""
    pos = ctx[C_POS]
    if pos >= ctx[C_CAP]:
        _call(ctx[C_SLOW], uc, kind, addr, size, value, ctx)   # grows the buffer
        if pos >= ctx[C_CAP]:
            return
    rec = carray(_i64p(ctx[C_BUF] + pos * (8 * RECORD)), RECORD)
    rec[0] = ctx[C_BASE] + carray(_i64p(ctx[C_COUNTER]), 1)[0]
    rec[1] = kind
    rec[2] = addr
    rec[3] = size
    rec[4] = value
    ctx[C_POS] = pos + 1


@cfunc(SIGNATURE, nopython=True, cache=True)
def verify_access(uc, kind, addr, size, value, ctx):
    """A mode: the same record as the reference's, on a machine page that backs its guest page
    now (a private frame for a write; a private or shared frame, or the zero frame for an
    untouched page, for a read). Anything else goes to Python."""
    pos = ctx[C_POS]
    ctx[C_POS] = pos + 1
    if ctx[C_DONE]:
        return
    if pos < ctx[C_CAP]:
        rec = carray(_i64p(ctx[C_BUF] + pos * (8 * RECORD)), RECORD)
        g = rec[2]
        if rec[1] == kind and rec[4] == value and rec[3] == size and (g ^ addr) & 0xFFF == 0 \
                and rec[0] == ctx[C_BASE] + carray(_i64p(ctx[C_COUNTER]), 1)[0]:
            gfn = g >> 12
            if gfn < ctx[C_NPAGES]:
                st = carray(_u8p(ctx[C_STATE] + gfn), 1)[0]
                frame = carray(_i64p(ctx[C_FRAME] + 8 * gfn), 1)[0]
                page = addr >> 12
                if kind == _WRITE:
                    if st == _PRIVATE and frame == page:
                        return
                elif (st == _PRIVATE or st == _SHARED) and frame == page or st == _UNBACKED and page == 0:
                    return
    _call(ctx[C_SLOW], uc, kind, addr, size, value, ctx)
