"""The MoE half of a decoder layer at decode batch 1 in one persistent launch: the residual add
and RMSNorm, the router GEMV, the top-k routing and both expert projections.

At batch 1 a Qwen3-30B-A3B layer's MoE half is four short kernels in a chain (the router GEMV
with its norm prologue, ``fused.moe_route``, ``fused_moe``'s gate/up and down kernels). Each
one's launch, ramp-up and tail sit between the weight streams: by knock-out on an H200 the
expert kernels took 25 us a layer for 75.5 MB (3.0 TB/s of ~4.3), the routing 2.3 us more
(docs/benchmarks.md, run 11). Here one program a SM runs three phases, separated by grid-wide
barriers instead of kernel boundaries, and each program issues the weight loads of its next
phase before it waits at the barrier (weights depend on no data; the experts' ids are known
before the down phase's barrier):

1. Every program computes ``h = round(o + residual)`` and the normed row (``_rms_norm_kernel``'s
   formula and roundings); program 0 stores h, the new residual. The programs share the
   router's E rows, ``block_r`` an item; each logit is rounded to x's dtype (the GEMV's output
   dtype) and stored as float32 in scratch.
2. Every program reads the E logits and routes them itself (``fused.route_topk``, moe_route's
   math: the same ids and rounded weights). The (slot, row block) items of the gate/up
   projection go round the programs, each item's [block_n, H] gate and up tiles loaded one item
   ahead; ``h = silu(gate) * up`` (``fused_moe.swiglu``) goes to scratch [k, I].
3. The down items (``block_h`` output rows, every slot's expert at once: ``fused_moe.down_rows``)
   go round the programs; each program loads its first item's first tile before the barrier,
   and each next item's first tile before the current item's work.

Barriers. ``SYNC`` (int32, zeroed once) holds one arrival counter per barrier, an exit counter
and an error count. A program's threads meet at a CTA barrier, then one release-add counts the
program in; it spins on a volatile load until all programs have arrived, then an acquire makes
their writes visible (scratch written by other programs is also read with ``.cg``, past L1).
The last program to exit zeroes the counters, so the next launch (the next layer's, ordered
after this one on the stream) starts from zero: a CUDA graph can replay it. A barrier needs all
programs resident at once: the grid is one program a SM and a program fits a SM alone. A
spin is bounded (``SPIN_LIMIT`` polls, about a second): if programs could not all be resident
(another process filling the SMs), the launch gives wrong outputs and counts an error in
``SYNC`` instead of hanging the GPU; ``sync_errors`` reads the count (tests assert it is 0).

Phases. ``phase`` 1, 2 or 3 runs that phase alone (three launches, no barriers): Triton's
interpreter runs programs one after another, so on the CPU the barriers could never be passed;
there the three launches test the same device code, and the GPU tests compare one launch with
three, bitwise.

Numerics: the kernels round where the chain rounds, and the routing is the same function, so the
results differ from the chain only in the order of float32 sums inside the dot products (the
router's logits are one sum here against gemv's split-K partials). On a GPU that can change a
rounded logit by 1 ulp, and an expert whose probability then ties the k-th largest could be
swapped (rare; never seen with random weights).

Scratch (logits, h, the counters) is cached per (device, E, k, I, dtype) and shared by every
layer's launch, which run one after another on one stream; two launches on concurrent streams
would mix it. It is allocated on first use and refused during CUDA graph capture (run the
shape once first, as the warm-up does).

Measured (H200, run 17 in docs/benchmarks.md; ``benchmarks/bench_moe_block.py``, CUDA-graph
replays of 8 Qwen3-30B-A3B layers, 76.0 MB of weights a layer): correct (bitwise the chain's
output, no barrier given up) but slower. The chain took 31.5 us a layer (0.56 of the copy
rate), this kernel 34.2 at best (``DEFAULT_TILES``, 0.52); in the engine a batch-1 step took
3.18 ms against 2.83. Its three phases as three launches took 43.8 us: the barriers cost less
than the kernel boundaries they replace, but the phases stream slower than the chain's many
short programs (the chain's two expert kernels: 75.5 MB in 23.4 us, 0.75 of the copy rate).
Tried and not kept: one program of eight warps a SM (45 us), more programs a SM (fewer fit),
and expert phases streamed through shared memory (cp.async, pipelined across items: 38.3 us at
best; commit 60ed83e).

Use: off by default. ``KVTIER_MOE_BLOCK=1`` at import makes ``SparseMoeBlock.forward_norm``
take it where ``use_moe_block`` says: one token, bf16 on CUDA.
"""

from __future__ import annotations

import functools
import os

import torch

from kvtier.kernels import fused, fused_moe

triton = fused.triton
tl = fused.tl

# Off by default: on an H200 it lost to the chain of kernels it replaces (run 17, below).
ENABLED: bool = triton is not None and os.environ.get("KVTIER_MOE_BLOCK", "0") == "1"
# Widest hidden size a program holds as one row (the normed row and the gate/up tiles).
MAX_HIDDEN = 8192
# SYNC's layout: the barriers' arrival counters, then the exit counter, then the error count.
_NUM_BARRIERS = 2
_EXIT = _NUM_BARRIERS
_ERRORS = _NUM_BARRIERS + 1
if triton is not None:
    _EXIT_C = tl.constexpr(_EXIT)
    _ERRORS_C = tl.constexpr(_ERRORS)


def use_moe_block(x: torch.Tensor, num_experts: int, top_k: int) -> bool:
    """Whether SparseMoeBlock takes ``moe_block`` for ``x`` [T, H]: one token, bf16 on a CUDA
    device, H <= MAX_HIDDEN, top-k <= E."""
    return (
        ENABLED
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and x.shape[0] == 1
        and x.shape[1] <= MAX_HIDDEN
        and 0 < top_k <= num_experts
    )


# ---------------------------------------------------------------------------- device code
# fmt: off
if triton is not None:
    _round = fused._round
    _rsqrt = fused._rsqrt
    _mean = fused._mean
    _pdl_wait = fused.pdl_wait

    @triton.jit
    def _grid_sync(SYNC, slot: tl.constexpr, nprog, SPIN_LIMIT: tl.constexpr):
        """Wait until every program of the grid has called this with the same ``slot``; what
        each wrote before its call is then visible to all (see the module docstring)."""
        tl.debug_barrier()
        # A scalar atomic is issued once per program.
        tl.atomic_add(SYNC + slot, 1, sem="release", scope="gpu")
        seen = tl.load(SYNC + slot, volatile=True)
        spins = 0
        while (seen < nprog) & (spins < SPIN_LIMIT):
            seen = tl.load(SYNC + slot, volatile=True)
            spins += 1
        seen = tl.atomic_add(SYNC + slot, 0, sem="acquire", scope="gpu")
        tl.atomic_add(SYNC + _ERRORS_C, (seen < nprog).to(tl.int32), sem="relaxed", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _grid_exit(SYNC, nprog):
        """Count this program out; the last one zeroes the barrier and exit counters."""
        tl.debug_barrier()
        done = tl.atomic_add(SYNC + _EXIT_C, 1, sem="acq_rel", scope="gpu")
        if done == nprog - 1:
            for i in tl.static_range(_EXIT_C + 1):
                tl.atomic_xchg(SYNC + i, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _normed_row(ATT, RES, NW, RES_OUT, cols, n_f, inv_n, eps, n_store,
                    HIDDEN: tl.constexpr, INTERPRET: tl.constexpr):
        """``norm(o + residual)`` [BLOCK_HID] in x's dtype, _rms_norm_kernel's formula; stores
        the first ``n_store`` columns of ``h = round(o + residual)`` into RES_OUT (HIDDEN in one
        program, 0 in the others: a scalar mask would trip the interpreter)."""
        dtype = ATT.dtype.element_ty
        mask = cols < HIDDEN
        o = tl.load(ATT + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(RES + cols, mask=mask, other=0.0).to(tl.float32)
        h = _round(o + r, dtype, INTERPRET)
        tl.store(RES_OUT + cols, h, mask=cols < n_store)
        x = h.to(tl.float32)
        ms = _mean(tl.sum(x * x, axis=0), n_f, inv_n, INTERPRET)
        xn = _round(x * _rsqrt(ms + eps, INTERPRET), dtype, INTERPRET)
        w = tl.load(NW + cols, mask=mask, other=0.0).to(tl.float32)
        return _round(w * xn.to(tl.float32), dtype, INTERPRET)

    @triton.jit
    def _route(LOGITS, num_experts, dtype: tl.constexpr, TOPK: tl.constexpr,
               RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
               INTERPRET: tl.constexpr):
        """(float32 weights rounded to ``dtype``, int64 ids) [BLOCK_S] from the logits in
        scratch (written by other programs: read past L1)."""
        e = tl.arange(0, BLOCK_E)
        x = tl.load(LOGITS + e, mask=e < num_experts, other=-float("inf"),
                    cache_modifier=".cg")
        w, ids = fused.route_topk(x, e, num_experts, TOPK, RENORMALIZE, BLOCK_E, BLOCK_S,
                                  INTERPRET)
        return _round(w, dtype, INTERPRET).to(tl.float32), ids

    @triton.jit
    def _gate_up_tiles(W13, ids, item, n_items, stride_we, stride_wn,
                       INTER: tl.constexpr, HIDDEN: tl.constexpr, TOPK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_S: tl.constexpr):
        """Gate and up rows [BLOCK_N, BLOCK_HID] of gate/up item ``item`` (slot item % TOPK,
        row block item // TOPK); no reads for an item past ``n_items``."""
        slot = item % TOPK
        expert = tl.sum(tl.where(tl.arange(0, BLOCK_S) == slot, ids, 0), axis=0)
        rows = (item // TOPK) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_HID)
        # (A vector bound, not `& (item < n_items)`: a scalar mask would trip the interpreter.)
        mask = (rows < tl.where(item < n_items, INTER, 0))[:, None] & (cols < HIDDEN)[None, :]
        ptrs = W13 + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
        gate = tl.load(ptrs, mask=mask, other=0.0)
        up = tl.load(ptrs + INTER * stride_wn, mask=mask, other=0.0)
        return gate, up

    @triton.jit
    def _moe_block_kernel(
        ATT, RES, NW, RW, W13, W2, OUT, RES_OUT, LOGITS, HACT, SYNC,
        n_f, inv_n, eps, num_experts,
        stride_re, stride_we, stride_wn, stride_w2e, stride_w2n, stride_w2k,
        HIDDEN: tl.constexpr, INTER: tl.constexpr, TOPK: tl.constexpr,
        RENORMALIZE: tl.constexpr, BLOCK_HID: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_I: tl.constexpr, PHASE: tl.constexpr, SPIN_LIMIT: tl.constexpr,
        INTERPRET: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Grid: (programs,), at most one a SM when PHASE is 0 (all phases, with barriers);
        PHASE 1 / 2 / 3 runs that phase alone."""
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        dtype = OUT.dtype.element_ty
        BLOCK_S: tl.constexpr = fused_moe._pow2(TOPK)
        cols = tl.arange(0, BLOCK_HID)
        c_mask = cols < HIDDEN
        xn = tl.zeros([BLOCK_HID], dtype=dtype)
        if PHASE == 0 or PHASE == 1:
            n_router = tl.cdiv(num_experts, BLOCK_R)
            # This program's first router rows: a weight, loaded before the wait.
            r_rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
            rw_next = tl.load(RW + r_rows.to(tl.int64)[:, None] * stride_re + cols[None, :],
                              mask=(r_rows < num_experts)[:, None] & c_mask[None, :], other=0.0)
            _pdl_wait(PDL)
            xn = _normed_row(ATT, RES, NW, RES_OUT, cols, n_f, inv_n, eps,
                             tl.where(pid == 0, HIDDEN, 0), HIDDEN,
                             INTERPRET)
            for item in range(pid, n_router, nprog):
                rw = rw_next
                r_rows = (item + nprog) * BLOCK_R + tl.arange(0, BLOCK_R)
                rw_next = tl.load(
                    RW + r_rows.to(tl.int64)[:, None] * stride_re + cols[None, :],
                    mask=(r_rows < num_experts)[:, None] & c_mask[None, :], other=0.0)
                rows = item * BLOCK_R + tl.arange(0, BLOCK_R)
                logit = tl.sum(rw.to(tl.float32) * xn.to(tl.float32)[None, :], axis=1)
                tl.store(LOGITS + rows, _round(logit, dtype, INTERPRET).to(tl.float32),
                         mask=rows < num_experts)
        if PHASE == 0:
            _grid_sync(SYNC, 0, nprog, SPIN_LIMIT)
        if PHASE == 2:
            xn = _normed_row(ATT, RES, NW, RES_OUT, cols, n_f, inv_n, eps, 0, HIDDEN,
                             INTERPRET)
        if PHASE == 0 or PHASE == 2 or PHASE == 3:
            weights, ids = _route(LOGITS, num_experts, dtype, TOPK, RENORMALIZE, BLOCK_E,
                                  BLOCK_S, INTERPRET)
        if PHASE == 0 or PHASE == 2:
            n_gu = TOPK * tl.cdiv(INTER, BLOCK_N)
            g_next, u_next = _gate_up_tiles(W13, ids, pid, n_gu, stride_we, stride_wn, INTER,
                                            HIDDEN, TOPK, BLOCK_N, BLOCK_HID, BLOCK_S)
            x_row = xn.to(tl.float32)[None, :]
            for item in range(pid, n_gu, nprog):
                gate = g_next
                up = u_next
                g_next, u_next = _gate_up_tiles(W13, ids, item + nprog, n_gu, stride_we,
                                                stride_wn, INTER, HIDDEN, TOPK, BLOCK_N,
                                                BLOCK_HID, BLOCK_S)
                rows = (item // TOPK) * BLOCK_N + tl.arange(0, BLOCK_N)
                h = fused_moe.swiglu(tl.sum(gate.to(tl.float32) * x_row, axis=1),
                                     tl.sum(up.to(tl.float32) * x_row, axis=1), dtype,
                                     INTERPRET)
                tl.store(HACT + (item % TOPK) * INTER + rows, h, mask=rows < INTER)
        if PHASE == 0 or PHASE == 3:
            n_down = tl.cdiv(HIDDEN, BLOCK_H)
            rows = pid * BLOCK_H + tl.arange(0, BLOCK_H)
            w_first = fused_moe.down_first_tile(W2, ids, rows, stride_w2e, stride_w2n,
                                                stride_w2k, HIDDEN, INTER, TOPK, BLOCK_I,
                                                BLOCK_S)
            if PHASE == 0:
                _grid_sync(SYNC, 1, nprog, SPIN_LIMIT)
            for item in range(pid, n_down, nprog):
                rows = item * BLOCK_H + tl.arange(0, BLOCK_H)
                w_cur = w_first
                # The next item's first tile before this item's work (rows past HIDDEN: no
                # reads), so a program always has a tile in flight.
                w_first = fused_moe.down_first_tile(W2, ids, rows + nprog * BLOCK_H,
                                                    stride_w2e, stride_w2n, stride_w2k, HIDDEN,
                                                    INTER, TOPK, BLOCK_I, BLOCK_S)
                fused_moe.down_rows(HACT, W2, OUT, 0, ids, weights, rows, w_cur, INTER,
                                    stride_w2e, stride_w2n, stride_w2k, 0, HIDDEN, INTER, TOPK,
                                    BLOCK_I, BLOCK_S, INTERPRET, ".cg")
        if PHASE == 0:
            _grid_exit(SYNC, nprog)
# fmt: on


# ---------------------------------------------------------------------------- host side
DEFAULT_TILES = {
    # The fastest of run 17's sweeps (call 6): two programs of four warps a SM, down items of
    # two output rows over the whole of I.
    "block_r": 1, "block_n": 4, "block_h": 2, "block_i": 1024, "num_warps": 4,
    "programs_per_sm": 2,
}  # fmt: skip
# Polls of a barrier's counter before the launch gives up on it (about a second on an H200).
SPIN_LIMIT = 1 << 20

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(
    device: torch.device, num_experts: int, top_k: int, inter: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [E] float32, h [k, I], SYNC int32) for a launch; see the module docstring."""
    key = (device, num_experts, top_k, inter, dtype)
    entry = _SCRATCH.get(key)
    if entry is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"moe_block: no scratch for E={num_experts}, k={top_k}, I={inter} on {device} "
                "during CUDA graph capture; run the shape once before capturing"
            )
        entry = (
            torch.empty(num_experts, dtype=torch.float32, device=device),
            torch.empty(top_k, inter, dtype=dtype, device=device),
            torch.zeros(_ERRORS + 1, dtype=torch.int32, device=device),
        )
        _SCRATCH[key] = entry
    return entry


def sync_errors(device: torch.device) -> int:
    """Barriers given up on (a spin past SPIN_LIMIT) by every launch on ``device`` so far."""
    return sum(int(e[2][_ERRORS]) for key, e in _SCRATCH.items() if key[0] == device)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_RESIDENT: dict[tuple, int] = {}


def _resident_per_sm(key: tuple, compile_kernel, num_warps: int, device_index: int) -> int:
    """How many programs of the compiled kernel fit on one SM at once (registers, threads,
    shared memory): the barriers need every program of the grid resident."""
    if key not in _RESIDENT:
        kernel = compile_kernel()
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device_index)
        threads = 32 * num_warps
        # Registers are allocated per warp in blocks of 256.
        regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
        smem = max(int(kernel.metadata.shared), 1)
        by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // smem
        _RESIDENT[key] = max(min(by_regs, by_threads, by_smem, 32), 1)
    return _RESIDENT[key]


def moe_block(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    phased: bool | tuple[int, ...] = False,
    num_programs: int | None = None,
    **tiles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SparseMoeBlock.forward_norm`` for one token: ``(experts(norm(h)), h)`` with
    ``h = round(x + residual)``; ``x`` / ``residual`` [1, H], ``norm_weight`` [H],
    ``router_weight`` [E, H], ``w13`` [E, 2I, H], ``w2`` [E, H, I].

    One persistent launch with grid-wide barriers, or with ``phased`` (always in Triton's
    interpreter) three launches, one per phase; a tuple of phases runs those alone (to time a
    phase: the others' outputs are then whatever the scratch holds). ``num_programs``
    (default: ``programs_per_sm`` a SM, fewer if fewer fit at once; 4 in the interpreter) and
    ``tiles`` (``DEFAULT_TILES``' keys) are for tests and sweeps: a ``num_programs`` too large
    for the whole grid to be resident at once counts barrier give-ups (``sync_errors``) and
    gives wrong outputs.
    ValueError names an argument that does not fit.
    """
    what = "moe_block"
    fused_moe.check_runnable(what, x)
    t, hidden, num_experts, inter = fused_moe._check_shapes(what, x, w13, w2)
    if t != 1:
        raise ValueError(f"{what}: x must hold one token, got shape {tuple(x.shape)}")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"{what}: residual must be {tuple(x.shape)} {x.dtype} (x's), got "
            f"{tuple(residual.shape)} {residual.dtype}"
        )
    if norm_weight.shape != (hidden,):
        raise ValueError(f"{what}: norm_weight must be [{hidden}], got {tuple(norm_weight.shape)}")
    if router_weight.shape != (num_experts, hidden):
        raise ValueError(
            f"{what}: router_weight must be [E, H] = {(num_experts, hidden)}, got "
            f"{tuple(router_weight.shape)}"
        )
    if not 0 < top_k <= num_experts:
        raise ValueError(f"{what}: top_k must be in [1, {num_experts}], got {top_k}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{what}: hidden size {hidden} is over MAX_HIDDEN ({MAX_HIDDEN})")
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"{what}: num_programs must be >= 1, got {num_programs}")
    unknown = set(tiles) - set(DEFAULT_TILES)
    if unknown:
        raise ValueError(f"{what}: unknown tiles {sorted(unknown)}")
    cfg = {**DEFAULT_TILES, **tiles}
    x = x.contiguous()
    residual = residual.contiguous()
    norm_weight = norm_weight.contiguous()
    router_weight = router_weight.contiguous()
    logits, hact, sync = _scratch(x.device, num_experts, top_k, inter, x.dtype)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    interpreted = fused.INTERPRETED
    if num_programs is None and (interpreted or not x.is_cuda):
        num_programs = 4
    block_hid = triton.next_power_of_2(hidden)
    common = dict(
        HIDDEN=hidden, INTER=inter, TOPK=top_k, RENORMALIZE=bool(renormalize),
        BLOCK_HID=block_hid, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_R=cfg["block_r"], BLOCK_N=min(cfg["block_n"], triton.next_power_of_2(inter)),
        BLOCK_H=min(cfg["block_h"], block_hid),
        BLOCK_I=min(cfg["block_i"], triton.next_power_of_2(inter)),
        SPIN_LIMIT=SPIN_LIMIT, INTERPRET=interpreted, num_warps=cfg["num_warps"],
        **fused._EXACT,
    )  # fmt: skip
    args = (
        x, residual, norm_weight, router_weight, w13, w2, out, res_out, logits, hact, sync,
        float(hidden), fused._inv(hidden), float(eps), num_experts,
        router_weight.stride(0), w13.stride(0), w13.stride(1),
        w2.stride(0), w2.stride(1), w2.stride(2),
    )  # fmt: skip
    if phased or interpreted:
        if num_programs is None:
            num_programs = _num_sms(x.device.index or 0) * cfg["programs_per_sm"]
        for phase in phased if isinstance(phased, tuple) else (1, 2, 3):
            _moe_block_kernel[(num_programs,)](*args, PHASE=phase, **common)
        return out, res_out
    launch = {**common, "PHASE": 0, **fused.pdl_options(x.device)}
    if num_programs is None:
        index = x.device.index or 0
        key = (index, x.dtype, *sorted((k, v) for k, v in common.items()))
        fits = _resident_per_sm(
            key,
            lambda: _moe_block_kernel.warmup(*args, grid=(1,), **launch),
            cfg["num_warps"],
            index,
        )
        num_programs = _num_sms(index) * min(cfg["programs_per_sm"], fits)
    _moe_block_kernel[(num_programs,)](*args, **launch)
    return out, res_out


def moe_block_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain moe_block replaces, in torch (the reference ops of each kernel)."""
    normed, h = fused.fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    logits = (normed.float() @ router_weight.float().T).to(x.dtype)
    weights, ids = fused.moe_route_ref(logits, top_k, renormalize, x.dtype)
    return fused_moe.fused_moe_ref(normed, w13, w2, ids, weights), h


__all__ = ["ENABLED", "moe_block", "moe_block_ref", "sync_errors", "use_moe_block"]
