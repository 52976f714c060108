"""GPTQ (arXiv 2210.17323): quantize a weight column by column, feeding each column's rounding
error back into the columns not yet quantized, weighted by the inverse Hessian H = XᵀX/n of the
layer's calibration inputs, so the layer *output* error stays small rather than the weight error.

Standard choices: 1% damping of the mean diagonal, dead inputs (H_jj = 0) zeroed, lazy batch
updates in blocks of `block_size` columns. The errors are fed back through the unit-diagonal
Cholesky factor F of H itself rather than the factor U of H⁻¹ (hessian.feedback_factor: the same
updates, with no inverse to form); a group's range is taken from its columns as U's
column-by-column form has them (`_group_as_compensated`), so the codes are the same.
Group parameters (group_axis="in") are computed from the already-updated weights when a group
starts; blocks hold whole groups, or cut one group into pieces the first of which begins where
the group begins, so at that moment every column of the group carries all earlier errors. With
group_axis="out" (per-IC) each column's parameters come from that column's groups of output
rows when it is quantized. Calibration inputs of block i come from the model with blocks
0..i-1 already quantized (fxforge.calibration.engine), as in the reference implementation.

Where the time goes, and how it is kept small (fp32 on CPU):
* The work is done on Wᵀ (K, N), so a column of W is a contiguous row: every per-column step
  (round, error, update) reads and writes contiguous memory.
* Inside a block, a column is brought up to date just before it is rounded by one
  matrix-vector product with the errors of the earlier columns of its *stretch* (SUB_BLOCK
  columns), and each stretch's errors reach the rest of the block in one matrix product;
  the columns after the block get all of the block's errors in ONE matrix product
  (GPTQ's "lazy batch" update). The per-column Python work is five vector operations
  (group_axis="in"), run on one thread (see `single_threaded`); everything O(N·K²) runs in
  BLAS on all of the caller's threads.
* Each column of W is read once, when its block starts (Wᵀ is read by a two-step transposing
  copy, `_read_columns`): the working matrix starts as zeros and accumulates the feedback.
* The factor F is one float32 Cholesky (hessian.feedback_factor, blocked so that its flops are
  matrix products), shared by the layers that read one input (q/k/v, gate/up), whose rows are
  stacked into one problem when short (`quantize_weights_gptq`).

Measured (bench/gptq_speed.py --threads 1, one TinyLlama-shaped layer, CPU time): 17–18 s for
the per-column implementation it replaced (tests/gptq_reference.py), about 2.7 s for this one,
of which about 1.5 s are the lazy-update and factorization flops at BLAS speed.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from fxforge.passes.methods import register_method
from fxforge.passes.quantize.common import check_option, orient, weight_of
from fxforge.passes.quantize.hessian import feedback_factor
from fxforge.passes.quantize.method import FAMILY, QuantizedLayer, WeightQuantizer
from fxforge.passes.quantize.rtn import QuantizedMatrix, QuantSpec, qparams, qparams_of_range, quantize_codes

SUB_BLOCK = 16  # columns per stretch inside a block (8 and 32 measured slower); the rest of the block gets a matmul
READ_CHUNK = 128  # columns of a source transposed at a time (_read_columns)
STACK_ROWS = 4096  # layers sharing an input are stacked up to this many rows (see _stacking_runs)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one thread, then restore the caller's setting.

    The work inside a block is hundreds of small operations in sequence; spread over threads,
    each one waits at a barrier for all of them, and on a busy machine a thread that is not
    scheduled stalls the others for a time slice (measured on 2 shared cores: a 256×2048
    layer took 2.4× longer with 2 threads than with 1). The large matrix products between
    blocks keep every thread.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def block_bounds(k: int, group_size: int, block_size: int, groups_along_columns: bool) -> list[tuple[int, int]]:
    """[start, stop) column ranges of the lazy-update blocks.

    With groups along the columns (group_axis="in") no block may contain a group start other
    than at its own start unless it holds that whole group: a group's parameters are taken when
    its first column is reached, from weights that must already carry every earlier column's
    error, and columns after the current block do not get the block's errors until it ends.
    """
    if not groups_along_columns:
        return [(s, min(s + block_size, k)) for s in range(0, k, block_size)]
    if group_size <= block_size:  # whole groups per block
        step = (block_size // group_size) * group_size
        return [(s, min(s + step, k)) for s in range(0, k, step)]
    return [(s, min(s + block_size, g0 + group_size))  # each group cut into blocks from its start
            for g0 in range(0, k, group_size) for s in range(g0, g0 + group_size, block_size)]


class _InputGroups:
    """Rounding when groups run along the input channels (group_axis="in").

    A group's (scale, zero) are taken from its g columns when its first column is reached and
    then serve its g columns; the codes are clamp(round(w/s), low−z, qmax−z) + z, which equals
    rtn.quantize_codes' clamp(round(w/s)+z, low, qmax) exactly (z is a small integer), and the
    dequantized value is the unshifted integer times s. The unshifted integers are what the
    column loop stores; the zero point is added once per group when the block ends.
    """

    def __init__(self, spec: QuantSpec, scales: Tensor, zeros: Tensor):
        self.spec, self.scales, self.zeros = spec, scales, zeros  # (K/g, N), filled group by group
        self.scale = self.low = self.high = None

    def start_group(self, index: int, group_columns: Tensor) -> None:
        """`group_columns` is (g, N): the group's columns as they stand now."""
        # The range along dim 0 of the (g, N) rows: max and min are exact in any order, so these
        # are rtn.qparams' values for the rows of W without a transposed copy.
        if self.spec.sym:
            extent = (group_columns.abs().amax(dim=0), None)
        else:
            extent = (group_columns.amax(dim=0), group_columns.amin(dim=0))
        scale, zero = qparams_of_range(extent, self.spec)
        low = 1.0 if self.spec.sym else 0.0
        self.scale, self.low, self.high = scale, low - zero, self.spec.qmax - zero
        self.scales[index], self.zeros[index] = scale, zero


def _round_output_groups(spec: QuantSpec, column: Tensor, codes_out: Tensor, scale_out: Tensor,
                         zero_out: Tensor) -> Tensor:
    """Rounding of one column when groups run along the output channels (group_axis="out"): the
    column's own groups of N/g rows get their parameters now. Returns the dequantized column."""
    chunks = column.reshape(-1, spec.group_size)
    scale, zero = qparams(chunks, spec)
    q = quantize_codes(chunks, scale, zero, spec)
    codes_out.copy_(q.reshape(-1))
    scale_out.copy_(scale[:, 0])
    zero_out.copy_(zero[:, 0])
    return ((q - zero) * scale).reshape(-1)


def _quantize_block(wt: Tensor, factor: Tensor, start: int, stop: int, block_err: Tensor,
                    round_column: Callable[[int], Tensor]) -> None:
    """Quantize columns [start, stop) (rows of wt) in order, each one's error reaching the later
    columns of the block; `block_err` comes in holding the block's ORIGINAL columns and leaves
    holding their errors W_i − q_i, for the lazy update (see hessian.feedback_factor).

    Column i's error reaches the rest of its sub-block by a rank-1 update, and the rest of the
    block by one matrix product per sub-block, so the Python loop only does small vector work.
    """
    for sub in range(start, stop, SUB_BLOCK):
        sub_stop = min(sub + SUB_BLOCK, stop)
        for col in range(sub, sub_stop):
            err = block_err[col - start].sub_(round_column(col))
            if col + 1 < sub_stop:
                wt[col + 1:sub_stop].addr_(factor[col, col + 1:sub_stop], err)
        if sub_stop < stop:
            wt[sub_stop:stop].addmm_(factor[sub:sub_stop, sub_stop:stop].T, block_err[sub - start:sub_stop - start])


def _sub_blocks(start: int, stop: int, group_size: int) -> list[tuple[int, int]]:
    """[a, b) stretches of at most SUB_BLOCK columns covering [start, stop), also cut where a
    group starts (a group's range is read from `wt`, which carries only the errors of finished
    stretches)."""
    out = []
    while start < stop:
        end = min(start + SUB_BLOCK, stop, (start // group_size + 1) * group_size)
        out.append((start, end))
        start = end
    return out


def _quantize_block_input_groups(wt: Tensor, feedback: Tensor, start: int, stop: int, block_err: Tensor,
                                 levels: Tensor, groups: _InputGroups,
                                 start_group: Callable[[int, Tensor, int], None]) -> None:
    """`_quantize_block` for group_axis="in", with the per-column work cut to five vector ops:
    `levels` (rows) receive the unshifted integer levels of columns [start, stop).

    Inside a stretch of SUB_BLOCK columns, column c is brought up to date just before it is
    rounded, by one matrix-vector product with the errors of the stretch so far (left-looking:
    the rows of `wt` in the stretch are only read), rather than each error being pushed into
    every later row of the stretch (that was a rank-1 update plus slicing per column). The
    errors of the stretch's columns not yet rounded still hold originals, so the product uses
    the strictly upper part of F's diagonal block, whose zeros drop them.
    """
    err_rows, level_rows, w_rows = block_err.unbind(0), levels.unbind(0), wt[start:stop].unbind(0)
    group_size = groups.spec.group_size
    for a, b in _sub_blocks(start, stop, group_size):
        if a % group_size == 0:
            start_group(a, block_err, start)
        scale, low, high = groups.scale, groups.low, groups.high
        weights = feedback[a:b, a:b].T.contiguous()  # row c − a: F[a:b, c], read up to the diagonal
        for col in range(a, b):
            i = col - start
            level = level_rows[i]
            if col == a:
                torch.div(w_rows[i], scale, out=level)
            else:  # the errors of the stretch so far, (N, col − a)
                torch.addmv(w_rows[i], block_err[a - start:i].T, weights[col - a, :col - a], out=level).div_(scale)
            level.round_().clamp_(low, high)
            err_rows[i].addcmul_(level, scale, value=-1.0)  # W_c − q_c
        if b < stop:
            wt[b:stop].addmm_(feedback[a:b, b:stop].T, block_err[a - start:b - start])


def _group_as_compensated(original: Tensor, shift: Tensor, feedback: Tensor, start: int, stop: int) -> Tensor:
    """Columns [start, stop) (rows of the result) as GPTQ's column-by-column form has them when
    column `start` is reached: the original weights moved to compensate every column before
    `start`, which is where a group's range is taken from.

    W_j + shift_j = W_j + Σ_{i<start} (W_i − q_i)·F_ij for these columns is exact for column `start`,
    but not the compensated value for the later ones (that is W_G + Σ_i (W_i − q_i)·V_iG·V_GG⁻¹
    with V_GG the group's diagonal block of V, see hessian.feedback_factor). Since
    F_GG = V_GG·diag(V_GG)⁻¹, the compensated columns are W_G + F_GG⁻ᵀ·shift_G: one small
    triangular inverse and one matrix product per group. `original` is W_G (rows, dead ones zero).
    """
    block = feedback[start:stop, start:stop]
    inverse = torch.linalg.solve_triangular(block, torch.eye(stop - start), upper=True, unitriangular=True)
    return torch.addmm(original, inverse.T, shift)


def gptq_factor(hessian: Tensor, damp: float = 0.01, *, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """What `quantize_weight_gptq` needs from a Hessian: (feedback factor, dead-input mask).

    Layers that read the same input (q/k/v, gate/up) share one: compute it once and pass it as
    `factor=` to each (the factorization is most of the time of a small layer)."""
    return feedback_factor(hessian, damp, rows=rows)


def quantize_weight_gptq(matrix: Tensor, spec: QuantSpec, hessian: Tensor | None, group_axis: str = "in", *,
                         damp: float = 0.01, block_size: int = 128, rows: int | None = None,
                         factor: tuple[Tensor, Tensor] | None = None) -> QuantizedMatrix:
    """GPTQ codes for `matrix` (W (N, K) for group_axis="in", Wᵀ (K, N) for "out", any float
    dtype: it is copied once into a float32 working matrix); hessian is (K, K).

    With `rows`, `hessian` is the Gram matrix XᵀX of that many rows (H = XᵀX / rows, formed in
    the factorization's own buffer rather than as one more K×K). With `factor` (from
    `gptq_factor` of the same Hessian, damp and rows), `hessian` is not read.
    """
    return quantize_weights_gptq([matrix], spec, hessian, group_axis, damp=damp, block_size=block_size, rows=rows,
                                 factor=factor)[0]


def quantize_weights_gptq(matrices: list[Tensor], spec: QuantSpec, hessian: Tensor | None, group_axis: str = "in", *,
                          damp: float = 0.01, block_size: int = 128, rows: int | None = None,
                          factor: tuple[Tensor, Tensor] | None = None) -> list[QuantizedMatrix]:
    """GPTQ codes for several layers that read the same input (q/k/v, gate/up: one Hessian), as
    `quantize_weight_gptq` gives each, from one factorization and, with group_axis="in", one pass
    over their rows stacked (up to STACK_ROWS rows): every step of the column-by-column algorithm acts on each row of W
    on its own (a row's codes, scales and errors depend only on that row and the shared factor),
    so stacking rows changes no result and runs the per-column loop once instead of once per
    layer. With group_axis="out" (groups along the rows) each layer gets its own pass.
    """
    if factor is None:
        factor = gptq_factor(hessian, damp, rows=rows)  # first: the factorization's K×K temporaries peak alone
    if group_axis != "in":
        return [_gptq([m], spec, factor, False, block_size)[0] for m in matrices]
    out: list[QuantizedMatrix] = []
    for run in _stacking_runs([m.shape[0] for m in matrices]):
        out += _gptq([matrices[i].T for i in run], spec, factor, True, block_size)
    return out


def _stacking_runs(heights: list[int]) -> list[list[int]]:
    """Consecutive layers grouped into runs of at most STACK_ROWS rows (a taller layer alone).

    Stacking saves per-column dispatch overhead, which matters for short layers (k/v: 256 rows)
    and not for tall ones, whose per-column vectors then outgrow the cache: gate+up stacked
    (11264 rows) measured 1.57 s against 1.22 s for the two alone (one core, shared factor)."""
    runs: list[list[int]] = []
    height = 0
    for i, h in enumerate(heights):
        if runs and height + h <= STACK_ROWS:
            runs[-1].append(i)
            height += h
        else:
            runs.append([i])
            height = h
    return runs


def _read_columns(sources: list[Tensor], start: int, stop: int, out: Tensor, dead: Tensor | None) -> Tensor:
    """Rows [start, stop) of the stacked sources (each (K, n_i)) as float32 into `out`; dead inputs zero.

    A source that is Wᵀ of a row-major W is read in two copies per READ_CHUNK rows: W's columns
    into a contiguous (n_i, rows) float32 buffer (contiguous runs of W, any dtype), then that
    buffer's transpose, which torch copies tile by tile; one strided copy straight from Wᵀ
    measured 6× slower (8.5 ms against 1.4 ms for 128 columns of a 5632×2048 W)."""
    offset = 0
    for source in sources:
        width = source.shape[1]
        for a in range(start, stop, READ_CHUNK):
            b = min(a + READ_CHUNK, stop)
            target, rows = out[a - start:b - start, offset:offset + width], source[a:b]
            if rows.stride(0) == 1 and rows.stride(1) != 1:
                by_row = torch.empty(width, b - a).copy_(rows.T)
                target.copy_(by_row.T if target.is_contiguous() else by_row.T.contiguous())
            else:
                target.copy_(rows)
        offset += width
    if dead is not None:
        out[dead[start:stop]] = 0.0
    return out


def _gptq(sources: list[Tensor], spec: QuantSpec, factor: tuple[Tensor, Tensor], per_row: bool,
          block_size: int) -> list[QuantizedMatrix]:
    """The algorithm on the sources (each (K, n_i): Wᵀ for group_axis="in", the matrix itself for
    "out") side by side; one QuantizedMatrix per source."""
    k = sources[0].shape[0]
    widths = [source.shape[1] for source in sources]
    n = sum(widths)
    g = spec.group_size
    feedback, dead_mask = factor
    dead = dead_mask if bool(dead_mask.any()) else None
    # Wᵀ (K, N) as float32, updated in place; it starts as zeros, the feedback Σ (W_i − q_i)·F_ij
    # the columns receive, and a block's rows become the weights (original + feedback) when the
    # block is read: each column of W is then read once (reading Wᵀ is a transposing copy).
    wt = torch.zeros(k, n)
    codes = torch.empty(k, n, dtype=torch.uint8)
    bounds = block_bounds(k, g, block_size, per_row)
    longest = max(stop - start for start, stop in bounds)
    # A block's codes as the rounding writes them (float rows), stored as bytes when the block
    # ends: a float32 K×N for every code would be 4× the bytes (0.5 GiB for a 7B LM head).
    staged = torch.empty(longest, n)
    scales = torch.zeros(k // g, n) if per_row else torch.zeros(k, n // g)  # per_row: transposed at the end
    zeros = torch.zeros_like(scales)
    errors = torch.empty(longest, n)  # a block's original columns, then their errors, row by row
    if per_row:
        groups = _InputGroups(spec, scales, zeros)

        def start_group(col: int, block_err: Tensor, first: int, wt: Tensor = wt) -> None:
            """The group's range, from weights already corrected by earlier columns."""
            stop = min(col + g, k)
            if stop <= first + len(block_err):  # the block's buffer still holds these columns' originals
                original = block_err[col - first:stop - first]
                shift = torch.sub(wt[col:stop], original)
            else:  # a group longer than the block (so it starts with the block): rows past it hold only the feedback
                original = _read_columns(sources, col, stop, torch.empty(stop - col, n), dead)
                shift = wt[col:stop].clone()
                shift[:len(block_err)].sub_(block_err)
            groups.start_group(col // g, _group_as_compensated(original, shift, feedback, col, stop))
    else:
        def round_column(col: int, first: int, wt: Tensor = wt, staged: Tensor = staged) -> Tensor:
            return _round_output_groups(spec, wt[col], staged[col - first], scales[col], zeros[col])

    for start, stop in bounds:
        block_err = _read_columns(sources, start, stop, errors[: stop - start], dead)
        wt[start:stop].add_(block_err)  # feedback + original: the block's current weights
        levels = staged[: stop - start]
        with single_threaded():
            if per_row:
                _quantize_block_input_groups(wt, feedback, start, stop, block_err, levels, groups, start_group)
                for g0 in range(start - start % g, stop, g):  # the codes: levels shifted by the zero point
                    a, b = max(g0, start) - start, min(g0 + g, stop) - start
                    levels[a:b].add_(zeros[g0 // g])
            else:
                _quantize_block(wt, feedback, start, stop, block_err, lambda col: round_column(col, start))
        codes[start:stop].copy_(levels)  # exact small integers
        if stop < k:  # the lazy batch update: the block's errors reach every later column at once
            wt[stop:].addmm_(feedback[start:stop, stop:].T, block_err)
    # the float32 K×N (held by the closures' defaults too) goes before the outputs are built
    if per_row:
        del start_group
    else:
        del round_column
    del errors, block_err, wt, staged, levels
    out, offset = [], 0
    for width in widths:
        part = slice(offset, offset + width)
        if per_row:  # codes (N, K), scales (N, K/g)
            out.append(QuantizedMatrix(codes=codes[:, part].T.contiguous(), scales=scales[:, part].T.contiguous(),
                                       zeros=zeros[:, part].T.contiguous().to(torch.uint8), group_size=g))
        else:
            out.append(QuantizedMatrix(codes=codes.contiguous(), scales=scales.contiguous(),
                                       zeros=zeros.contiguous().to(torch.uint8), group_size=g))
        offset += width
    return out


# --------------------------------------------------------------------------- the method


@register_method(FAMILY)
@dataclass(frozen=True)
class Gptq(WeightQuantizer):
    """quantize(method=gptq): error feedback weighted by the inverse Hessian of the layer's inputs.

    damp: fraction of mean diag(H) added to the diagonal (0 ≤ damp < 1).
    block_size: columns per lazy-update block.
    """

    name = "gptq"
    needs_calibration = True
    statistics = ("gram",)
    takes_low_precision = True  # quantize_weight_gptq copies the weight into its float32 Wᵀ itself
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        check_option(0 <= self.damp < 1, f"quantize: damp={self.damp} must be in [0, 1)")
        check_option(isinstance(self.block_size, int) and self.block_size > 0,
                     f"quantize: block_size={self.block_size!r} must be a positive integer")
        object.__setattr__(self, "_shared", _SharedInputs())  # per-block state, not an option

    def prepare_block(self, gm, sites, specs, stats, group_axis, semantics) -> dict:
        self._shared.start_block(gm, sites, specs, stats)
        short = [(s.module_path, stats[s.node.name].rows, s.in_features) for s in sites
                 if stats[s.node.name].rows < s.in_features]
        return {"rank_deficient": short} if short else {}

    def quantize(self, matrix, spec, site, stats, group_axis) -> QuantizedLayer:
        shared = self._shared
        name = site.node.name
        if name in shared.ready:  # quantized with the first layer of its input group
            return QuantizedLayer(shared.ready.pop(name))
        partners = shared.take_group(name) or [site]
        mine = [p.node.name for p in partners].index(name)
        matrices = [matrix if i == mine else orient(weight_of(shared.gm, p), group_axis)
                    for i, p in enumerate(partners)]
        # The Gram matrix and its row count, not stats.hessian: that would be one more K×K.
        results = quantize_weights_gptq(matrices, spec, stats.gram, group_axis, damp=self.damp,
                                        block_size=self.block_size, rows=stats.rows)
        for i, (partner, result) in enumerate(zip(partners, results)):
            if i != mine:
                shared.ready[partner.node.name] = result
        return QuantizedLayer(results[mine])

    def finish(self, notes: dict) -> None:
        """GPTQ with fewer calibration rows than input features has a singular Hessian and fits
        the calibration set instead of the layer: on minilm at 2 bits with 190 tokens (< 384
        features) held-out cosine fell to 0.10 at damp=0.01 versus 0.36 for RTN, and rose to
        0.46 / 0.54 at damp=0.1 / 0.5. Say so rather than return a quietly worse model."""
        self._shared.start_block(None, [], {}, {})
        short = notes.pop("rank_deficient", [])
        if not short:
            return
        notes["rank_deficient_layers"] = len(short)
        path, rows, features = short[0]
        warnings.warn(
            f"quantize(method='gptq'): {len(short)} layer(s) saw fewer calibration tokens than input features "
            f"(e.g. {path}: {rows} < {features}), so their Hessian is singular and GPTQ will overfit the "
            f"calibration set. Give more calibration data (hundreds of thousands of tokens is standard) or "
            f"raise damp (now {self.damp}; 0.1 or more).", stacklevel=4)


class _SharedInputs:
    """The current block's layers grouped by the input they read (one `InputStatistics` object,
    e.g. q/k/v, gate/up) with equal QuantSpecs: the first of a group to reach `Gptq.quantize`
    quantizes the whole group at once (`quantize_weights_gptq`), and the others' results wait
    in `ready` for their own call (the pass asks layer by layer)."""

    def __init__(self) -> None:
        self.start_block(None, [], {}, {})

    def start_block(self, gm, sites, specs, stats) -> None:
        self.gm = gm
        self.ready: dict[str, QuantizedMatrix] = {}
        groups: dict[tuple, list] = {}
        for site in sites:
            groups.setdefault((id(stats[site.node.name]), specs[site.node.name]), []).append(site)
        self.groups = {site.node.name: group for group in groups.values() for site in group}

    def take_group(self, name: str) -> list:
        """The layers to quantize with layer `name` (itself included; empty for a layer the block
        did not name), each handed out once."""
        group = self.groups.get(name, [])
        for site in group:
            self.groups.pop(site.node.name, None)
        return group
