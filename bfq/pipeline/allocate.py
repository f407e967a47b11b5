"""Bit allocation to an exact budget from a sensitivity analysis (BITSFUSION.md §3.3, §5.1).

Input: a ``bfq-sensitivity`` object (:mod:`bfq.pipeline.analyze`, ``spec/sensitivity.schema.json``) that lists
every quantizable layer of a model with its weight count, the measured error of quantizing that
layer alone to each candidate bit-width (1, 2, 3 by default), the layers with fixed bits
(``conv_in``/``conv_out`` at 8) and the accounting constants (N_w, N_tf, level set).

Output: an :class:`Allocation`, which saves as a ``bfq-recipe`` (``spec/recipe.schema.json``) and
reports its average bits by the paper's accounting (§5.1)::

    avg_bits = (Σ_i log2(L_i) · N_i + 16 · N_tf) / N_w

computed exactly as :func:`bfq.quant.recipe.average_bits` and ``bfq inspect`` compute it (same terms,
same order, same N_w = every Linear/Conv weight of the original UNet, same N_tf), so the number an
allocator prints is the number ``bfq inspect`` prints for the file exported with its recipe.

Three allocators (four methods; :data:`DEFAULT_ALLOCATOR` is what ``bfq allocate --method`` and
``bfq quantize --allocator`` use unless told otherwise):

* :func:`allocate_paper`: Alg. 1. ``S_{i,b} = M_{i,b} · N_i^-η`` (η = 0.3); ``b_i`` = the smallest
  candidate with ``S_{i,b} < S_o``, else ``max(candidates) + 1`` (4); then +1 bit for layers whose
  alignment drop at the top candidate exceeds the 90th, +1 above the 95th and +1 above the 98th
  percentile; conv_in/conv_out stay at 8. The threshold ``S_o`` is found by bisection: the average
  bits are a non-increasing step function of ``S_o`` whose steps sit at the measured ``S`` values,
  so a binary search over those values finds the *largest* average that does not exceed the budget.
* :func:`allocate_optimal`: minimises the summed measured error ``Σ_i M_{i,b_i}`` subject to the
  budget (a multiple-choice knapsack) by dynamic programming over the budget slack discretised
  into ``resolution`` units (costs rounded *up*, so the result is always feasible), followed by a
  greedy pass that spends what the rounding left over. It also reports the Lagrangian lower bound
  on the optimum, so the optimality gap of the answer is known. The paper has no such allocator.
  Method ``"optimal"`` minimises the error alone. Method ``"optimal-align"`` minimises
  ``Σ M/ΣM_1 + w · Σ A⁺/ΣA⁺_1`` with A the alignment drop (``align_drop``: CLIP score or digit
  classifier, image mode; ``guidance_err``: proxy mode), each sum normalised by its value with every
  layer at the fewest bits: the paper's Observation 2 is that the image error misses layers
  (cross-attention ``to_k``) whose quantization hurts text alignment, which Alg. 1 handles with
  its refinement step and an error-only knapsack cannot see.
* :func:`allocate_size_only`: a baseline that sees layer sizes but no measurements: Alg. 1 with
  ``M_{i,b}`` replaced by ``4^-b`` (the error a Gaussian-like layer would have) and no refinement, so
  small layers get more bits and large ones fewer.

The allocation problem and the three allocators that share it are one cohesive thing, hence
the module's length. It does not import torch (``bfq allocate`` starts fast). Reading sensitivity files is
:mod:`bfq.pipeline.sensitivity`; ``bfq quantize --bits`` runs analysis and allocation through
:func:`bfq.pipeline.quantize.recipe_for_budget`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bfq._io import write_text_atomic
from bfq.format.constants import MAX_BITS, MIN_BITS, bits_per_level_ideal
from bfq.pipeline.sensitivity import (
    SensitivityError,
    _is_int,
    _is_number,
    _summarize,
    load_sensitivity,
)

RECIPE_FORMAT = "bfq-recipe"  # = bfq.quant.recipe.RECIPE_FORMAT (not imported: that module imports torch)
RECIPE_VERSION = 1
DEFAULT_ETA = 0.3
DEFAULT_PERCENTILES = (90.0, 95.0, 98.0)
METHODS = ("paper", "optimal", "optimal-align", "size-only")
# The allocator every entry point uses unless told otherwise (`bfq allocate --method`, `bfq quantize
# --allocator`, quantize(), recipe_for_budget()): the best measured on tiny-sd (README, Results).
DEFAULT_ALLOCATOR = "optimal-align"
DEFAULT_ALIGN_WEIGHT = 0.5  # chosen on tiny-sd: weights 0.1-0.5 keep FD within 3% of the error-only plan, 1 costs +56%
ALIGN_METRICS = ("align_drop", "guidance_err")  # in order of preference for the paper's refinement


# ------------------------------------------------------------------------------- the problem


@dataclass
class _Problem:
    order: list[str]  # every recipe layer, model order
    counts: dict[str, int]
    fixed: dict[str, int]
    names: list[str]  # layers to allocate, model order
    n: np.ndarray  # float64 [L]
    cand: list[int]  # candidate bit-widths, ascending
    levels: str
    n_tf: int
    n_w: int
    time_cache: str | None
    sens: dict

    def matrix(self, metric: str, bits: list[int] | None = None) -> np.ndarray:
        """``[L, K]`` float64 of ``metric`` for every allocated layer and candidate; names what is missing."""
        bits = self.cand if bits is None else bits
        out = np.empty((len(self.names), len(bits)))
        missing = []
        for i, name in enumerate(self.names):
            errors = self.sens["layers"][name].get("errors", {})
            for k, b in enumerate(bits):
                v = errors.get(str(b), {}).get(metric)
                if v is None:
                    missing.append(f"{name}@{b}")
                else:
                    out[i, k] = float(v)
        if missing:
            raise SensitivityError(
                f"the sensitivity analysis has no {metric!r} for {_summarize(missing)} (incomplete analysis? "
                "rerun `bfq analyze` with the same -o to finish it)"
            )
        return out

    def has_metric(self, metric: str, bits: int) -> bool:
        return all(metric in self.sens["layers"][n].get("errors", {}).get(str(bits), {}) for n in self.names)

    def avg_bits(self, bits: Mapping[str, int]) -> float:
        """The paper's average bits, term by term as :func:`bfq.quant.recipe.average_bits` and ``bfq inspect``."""
        total = sum(bits_per_level_ideal(b, self.levels) * self.counts[n] for n, b in bits.items())
        return (total + 16.0 * self.n_tf) / self.n_w

    def plan(self, alloc_bits) -> dict[str, int]:
        chosen = dict(zip(self.names, (int(b) for b in alloc_bits)))
        return {n: self.fixed[n] if n in self.fixed else chosen[n] for n in self.order}

    def uniform_avg(self, b: int) -> float:
        return self.avg_bits(self.plan([b] * len(self.names)))


def _problem(sens, *, fixed: Mapping[str, int] | None = None, n_time_features: int | None = None,
             need_layers: list[str] | None = None) -> _Problem:  # fmt: skip
    sens = load_sensitivity(sens)
    layers = sens["layers"]
    acc = sens["accounting"]
    file_fixed = {n: e["fixed_bits"] for n, e in layers.items() if "fixed_bits" in e}
    extra = dict(fixed or {})
    unknown = [n for n in extra if n not in layers]
    if unknown:
        raise SensitivityError(f"fixed bits for layers the sensitivity file does not list ({_summarize(unknown)})")
    bad = [n for n, b in extra.items() if not (_is_int(b) and MIN_BITS <= b <= MAX_BITS)]
    if bad:
        raise SensitivityError(f"fixed bits must be integers in {MIN_BITS}..{MAX_BITS} ({_summarize(bad)})")
    all_fixed = {**file_fixed, **extra}
    if need_layers is not None:
        missing = [n for n in need_layers if n not in layers]
        unknown = [n for n in layers if n not in set(need_layers)]
        if missing or unknown:
            parts = ([f"missing layers {_summarize(missing)}"] if missing else []) + (
                [f"unknown layers {_summarize(unknown)}"] if unknown else []
            )
            raise SensitivityError("the sensitivity file does not fit this model: " + "; ".join(parts))
    names = [n for n in layers if n not in all_fixed]
    if not names:
        raise SensitivityError("the sensitivity file has no layers to allocate (all are fixed)")
    n_tf = acc["n_time_features"] if n_time_features is None else int(n_time_features)
    if n_tf < 0:
        raise SensitivityError(f"n_time_features must be >= 0, got {n_tf}")
    counts = {n: e["n_weights"] for n, e in layers.items()}
    return _Problem(
        order=list(layers), counts=counts, fixed=all_fixed, names=names,
        n=np.array([counts[n] for n in names], dtype=np.float64), cand=sorted(sens["settings"]["bits"]),
        levels=acc["levels"], n_tf=n_tf, n_w=acc["n_weights_total"], time_cache=acc.get("time_cache"), sens=sens,
    )  # fmt: skip


def _first_last(prob: _Problem) -> str:
    """The layers the analysis fixed (a UNet's ``conv_in/conv_out``; a DiT's patch embedding and final
    projection), for notes."""
    fixed = [n.removesuffix(".weight") for n, e in prob.sens["layers"].items() if "fixed_bits" in e]
    return "/".join(fixed) or "no layer"


def _check_budget(prob: _Problem, budget: float) -> None:
    if not _is_number(budget) or not math.isfinite(budget):
        raise SensitivityError(f"the bit budget must be a finite number, got {budget!r}")
    lo, hi = prob.uniform_avg(MIN_BITS), prob.uniform_avg(MAX_BITS)
    fixed = f" with {', '.join(f'{n} at {b}' for n, b in prob.fixed.items())}" if prob.fixed else ""
    if budget < lo:
        raise SensitivityError(
            f"budget {budget} bits is below what all-{MIN_BITS}-bit reaches on this model ({lo:.4f} average bits{fixed}, "
            f"N_tf = {prob.n_tf} cached time features); raise the budget"
        )
    if budget > hi:
        raise SensitivityError(
            f"budget {budget} bits is above what all-{MAX_BITS}-bit reaches on this model ({hi:.4f} average bits): "
            "there is nothing to allocate; use --recipe uniform-8"
        )


# ------------------------------------------------------------------------------- the result


@dataclass
class Allocation:
    """A bit plan chosen for a budget. ``bits`` covers every recipe layer in model order.

    ``avg_bits`` is the paper's accounting (what ``bfq inspect`` reports for the exported file);
    ``predicted_error`` the summed measured error of the allocated layers (metric ``details['metric']``)
    when the analysis measured every chosen bit-width, else None.
    """

    name: str
    method: str
    budget: float
    levels: str
    bits: dict[str, int]
    avg_bits: float
    n_weights: dict[str, int]
    n_time_features: int
    n_weights_total: int
    time_cache: str | None
    predicted_error: float | None
    details: dict = field(default_factory=dict)
    notes: str = ""

    def recipe_json(self) -> dict:
        """The ``bfq-recipe`` object (``spec/recipe.schema.json``)."""
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "name": self.name, "levels": self.levels,
                "bits": dict(self.bits), "notes": self.notes}  # fmt: skip

    def to_recipe(self):
        """A :class:`bfq.quant.recipe.Recipe` (imports torch)."""
        from bfq.quant.recipe import Recipe

        return Recipe.from_json(self.recipe_json())

    def save(self, path) -> Path:
        """Write the recipe JSON atomically (same layout as :meth:`bfq.quant.recipe.Recipe.save`)."""
        return write_text_atomic(path, json.dumps(self.recipe_json(), indent=1) + "\n")

    def summary(self) -> dict:
        by_bits: dict[int, int] = {}
        for b in self.bits.values():
            by_bits[b] = by_bits.get(b, 0) + 1
        return {
            "name": self.name, "method": self.method, "budget": self.budget, "levels": self.levels,
            "time_cache": self.time_cache, "avg_bits": self.avg_bits, "n_layers": len(self.bits),
            "layers_by_bits": {str(b): by_bits[b] for b in sorted(by_bits)},
            "n_quantized_weights": sum(self.n_weights[n] for n in self.bits),
            "n_time_features": self.n_time_features, "n_weights_total": self.n_weights_total,
            "predicted_error": self.predicted_error, "details": self.details,
        }  # fmt: skip


def _predicted_error(prob: _Problem, plan: Mapping[str, int], metric: str) -> float | None:
    total = 0.0
    for n in prob.names:
        v = prob.sens["layers"][n].get("errors", {}).get(str(plan[n]), {}).get(metric)
        if v is None:
            return None
        total += float(v)
    return total


def _result(prob: _Problem, method: str, budget: float, alloc_bits, metric: str, details: dict,
            notes: str) -> Allocation:  # fmt: skip
    plan = prob.plan(alloc_bits)
    avg = prob.avg_bits(plan)
    if avg > budget:  # every allocator guarantees this; a failure here is a bug, not bad input
        raise AssertionError(f"{method} allocation exceeds the budget: {avg} > {budget}")
    fixed = [n for n, e in prob.sens["layers"].items() if "fixed_bits" in e]
    details = {"metric": metric, **details, "fixed_layers": fixed}
    return Allocation(
        name=f"alloc-{method}-{budget:g}", method=method, budget=float(budget), levels=prob.levels, bits=plan,
        avg_bits=avg, n_weights=dict(prob.counts), n_time_features=prob.n_tf, n_weights_total=prob.n_w,
        time_cache=prob.time_cache, predicted_error=_predicted_error(prob, plan, metric), details=details,
        notes=f"{notes}; {avg:.6f} average bits (budget {budget:g}); analysis {prob.sens['model']['fingerprint'][:16]}",
    )  # fmt: skip


# ------------------------------------------------------------------------- threshold search


def _threshold_search(prob: _Problem, S: np.ndarray, add: np.ndarray, max_bits: int, budget: float):
    """Alg. 1's bit choice for the threshold that gives the largest average bits <= ``budget``.

    ``b_i(S_o)`` = smallest candidate with ``S_ik < S_o`` else ``max_bits``, plus ``add_i``, capped at 8.
    Returns ``(bits [L], S_o, steps)``; raises when even the largest threshold exceeds the budget.
    """
    cand = np.array(prob.cand)
    values = np.unique(S)  # the thresholds where the plan changes (S < S_o  <=>  S <= values[j])

    def bits_at(j: int) -> np.ndarray:
        if j < 0:
            base = np.full(len(prob.names), max_bits)
        else:
            passing = S <= values[j]
            base = np.where(passing.any(1), cand[passing.argmax(1)], max_bits)
        return np.minimum(base + add, MAX_BITS)

    def avg(j: int) -> float:
        return prob.avg_bits(prob.plan(bits_at(j)))

    steps = 0
    lo, hi = -1, len(values) - 1  # avg(j) is non-increasing in j
    if avg(hi) > budget:
        return None, None, steps
    if avg(lo) <= budget:
        hi = lo
    while hi - lo > 1:  # invariant: avg(hi) <= budget < avg(lo)
        mid = (lo + hi) // 2
        steps += 1
        if avg(mid) <= budget:
            hi = mid
        else:
            lo = mid
    j = hi
    if j < 0:
        s_o = float(values[0])  # nothing is strictly below the smallest score
    elif j + 1 < len(values):
        s_o = float(values[j] + (values[j + 1] - values[j]) / 2)
    else:
        s_o = float(values[j] * 2 if values[j] > 0 else 1.0)
    return bits_at(j), s_o, steps


def _pick_align_metric(prob: _Problem, align_metric: str | None, bits: int | list[int]) -> str | None:
    """``align_metric``, checked to be measured at ``bits`` for every layer; "auto": the first of
    :data:`ALIGN_METRICS` that is, or None."""
    bits = [bits] if isinstance(bits, int) else list(bits)
    if align_metric is None:
        return None
    if align_metric != "auto":
        missing = [b for b in bits if not prob.has_metric(align_metric, b)]
        if missing:
            raise SensitivityError(f"the sensitivity analysis has no {align_metric!r} at {missing[0]} bits for every layer")
        return align_metric
    for m in ALIGN_METRICS:
        if all(prob.has_metric(m, b) for b in bits):
            return m
    return None


def allocate_paper(sens, budget: float, *, eta: float = DEFAULT_ETA, metric: str = "mse",
                   align_metric: str | None = "auto", percentiles=DEFAULT_PERCENTILES, max_bits: int | None = None,
                   fixed: Mapping[str, int] | None = None, n_time_features: int | None = None,
                   need_layers: list[str] | None = None) -> Allocation:  # fmt: skip
    """The paper's Alg. 1 with the threshold ``S_o`` bisected to the budget.

    Args:
        sens: a sensitivity object or path (:func:`load_sensitivity`).
        budget: average bits by the paper's accounting; the result never exceeds it.
        eta: the size factor η of ``S = M · N^-η`` (paper: 0.3).
        metric: the image-error metric M ("mse").
        align_metric: the alignment drop used by the refinement step: "align_drop" (CLIP / digit
            classifier, image mode), "guidance_err" (proxy mode's stand-in), "auto" (the first of those
            the analysis has), or None (no refinement). Measured at the largest candidate bit-width.
        percentiles: the refinement thresholds (+1 bit above each).
        max_bits: bits of a layer no candidate satisfies (default: largest candidate + 1, i.e. 4).
        fixed: extra ``{layer: bits}`` to keep out of the allocation (the first and last layers,
            conv_in/conv_out of a UNet, are fixed by the sensitivity file already).
        n_time_features: N_tf override (default: the analysis's).
        need_layers: when given, the exact recipe layer list of the target model (checked).
    Raises:
        SensitivityError: bad or incomplete analysis, or a budget outside what the allocator reaches.
    """
    prob = _problem(sens, fixed=fixed, n_time_features=n_time_features, need_layers=need_layers)
    _check_budget(prob, budget)
    if not (_is_number(eta) and eta >= 0):
        raise SensitivityError(f"eta must be a number >= 0, got {eta!r}")
    top = prob.cand[-1]
    max_bits = min(top + 1, MAX_BITS) if max_bits is None else int(max_bits)
    M = prob.matrix(metric)
    if (M < 0).any():
        raise SensitivityError(f"negative {metric!r} values in the analysis")
    S = M * prob.n[:, None] ** (-float(eta))
    align = _pick_align_metric(prob, align_metric, top)
    add = np.zeros(len(prob.names), dtype=np.int64)
    pct = {}
    if align is not None:
        C = prob.matrix(align, [top])[:, 0]
        for p in percentiles:
            thr = float(np.percentile(C, p))
            pct[f"p{p:g}"] = thr
            add += C > thr
    bits, s_o, steps = _threshold_search(prob, S, add, max_bits, budget)
    if bits is None:
        floor = prob.avg_bits(prob.plan(np.minimum(prob.cand[0] + add, MAX_BITS)))
        raise SensitivityError(
            f"budget {budget} bits is below what the paper's allocator reaches ({floor:.4f}: every layer at "
            f"{prob.cand[0]} bit plus the alignment refinement's extra bits); raise the budget, or use "
            "--no-refine or the optimal allocator"
        )
    ceiling = prob.avg_bits(prob.plan(np.minimum(max_bits + add, MAX_BITS)))
    notes = (f"BitsFusion Alg. 1: S = {metric}*N^-{eta:g}, S_o = {s_o:.6g} by bisection, "
             + (f"+1/+1/+1 bits above the {'/'.join(f'{p:g}' for p in percentiles)}th percentiles of "
                f"{align} at {top} bits" if align else "no alignment refinement")
             + f", {_first_last(prob)} 8-bit")  # fmt: skip
    details = {"eta": eta, "threshold": s_o, "bisection_steps": steps, "align_metric": align,
               "percentiles": pct, "refined_layers": int((add > 0).sum()), "max_bits": max_bits,
               "ceiling_avg_bits": ceiling}  # fmt: skip
    if ceiling <= budget:
        details["note"] = f"the budget is above the allocator's ceiling ({ceiling:.4f} bits); every layer got its most"
    return _result(prob, "paper", budget, bits, metric, details, notes)


def allocate_size_only(sens, budget: float, *, eta: float = DEFAULT_ETA, max_bits: int | None = None,
                       fixed: Mapping[str, int] | None = None, n_time_features: int | None = None,
                       need_layers: list[str] | None = None) -> Allocation:  # fmt: skip
    """Baseline: bits by layer size alone (Alg. 1 with ``M_{i,b} = 4^-b``, no refinement).

    Uses only the layer list and accounting of ``sens`` (its measurements are ignored; an
    unfinished analysis is fine). Same budget rule as :func:`allocate_paper`.
    """
    prob = _problem(sens, fixed=fixed, n_time_features=n_time_features, need_layers=need_layers)
    _check_budget(prob, budget)
    max_bits = min(prob.cand[-1] + 1, MAX_BITS) if max_bits is None else int(max_bits)
    S = (4.0 ** -np.array(prob.cand, dtype=np.float64))[None, :] * prob.n[:, None] ** (-float(eta))
    bits, s_o, steps = _threshold_search(prob, S, np.zeros(len(prob.names), dtype=np.int64), max_bits, budget)
    if bits is None:  # cannot happen after _check_budget unless cand[0] > 1
        raise SensitivityError(f"budget {budget} bits is below every layer at {prob.cand[0]} bits")
    notes = f"size-only baseline: S = 4^-b*N^-{eta:g}, S_o = {s_o:.6g} by bisection, {_first_last(prob)} 8-bit"
    details = {"eta": eta, "threshold": s_o, "bisection_steps": steps, "max_bits": max_bits}
    metric = "mse"
    return _result(prob, "size-only", budget, bits, metric, details, notes)


# ---------------------------------------------------------------------------------- optimal


def _lagrangian_bound(E: np.ndarray, W: np.ndarray, slack: float) -> tuple[float, float]:
    """``max_λ>=0  Σ_i min_k (E_ik + λ W_ik) − λ·slack`` (a lower bound on the knapsack optimum) and its λ.

    The dual function is concave and piecewise linear; its maximum is at λ = 0 or at a breakpoint
    ``(E_ik − E_ij) / (W_ij − W_ik)``, all of which are evaluated.
    """
    dE = E[:, :, None] - E[:, None, :]
    dW = W[:, None, :] - W[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = dE / dW
    lam = lam[np.isfinite(lam) & (lam > 0)]
    lam = np.unique(np.concatenate([[0.0], lam]))
    best, best_lam = -np.inf, 0.0
    for chunk in np.array_split(lam, max(1, len(lam) // 2048)):
        g = (E[None] + chunk[:, None, None] * W[None]).min(2).sum(1) - chunk * slack
        i = int(np.argmax(g))
        if g[i] > best:
            best, best_lam = float(g[i]), float(chunk[i])
    return best, best_lam


def _alignment_objective(prob: _Problem, metric: str, align: str, weight: float) -> tuple[np.ndarray, dict]:
    """``M / ΣM_1 + weight · A⁺ / ΣA⁺_1``: the error and the alignment drop (negative drops are
    measurement noise, counted as none), each divided by its sum over the layers at the smallest
    candidate, so ``weight`` 1 makes "all layers at the fewest bits" cost as much in either."""
    M, A = prob.matrix(metric), np.maximum(prob.matrix(align), 0.0)
    norm_m, norm_a = float(M[:, 0].sum()), float(A[:, 0].sum())
    E = M / norm_m if norm_m > 0 else M
    if norm_a > 0:
        E = E + weight * A / norm_a
    return E, {"align_metric": align, "align_weight": weight, "norm": {metric: norm_m, align: norm_a}}


def allocate_optimal(sens, budget: float, *, metric: str = "mse", align_metric: str | None = None,
                     align_weight: float = DEFAULT_ALIGN_WEIGHT, resolution: int = 20000,
                     fixed: Mapping[str, int] | None = None, n_time_features: int | None = None,
                     need_layers: list[str] | None = None) -> Allocation:  # fmt: skip
    """Minimise the summed measured error ``Σ_i M_{i,b_i}`` subject to ``avg_bits <= budget``, or,
    with ``align_metric``, the error plus ``align_weight`` times the alignment drop (each summed
    over the layers and normalised, see :func:`_alignment_objective`).

    Each layer picks one of the measured bit-widths (a multiple-choice knapsack). Exact dynamic
    programming over the slack ``budget·N_w − cost(all layers at the smallest candidate)`` cut into
    ``resolution`` units with each layer's extra cost rounded *up* (so the result never exceeds the
    budget, and is optimal for the rounded costs), then a greedy pass spends the exact slack that
    rounding left. ``details`` holds the Lagrangian lower bound and the resulting optimality gap.

    Args:
        align_metric: "align_drop" (image mode), "guidance_err" (proxy mode), "auto" (the first of
            those the analysis has at every candidate; none: the error alone, said in the notes)
            or None (the error alone).
        align_weight: weight of the alignment term (> 0).
    """
    prob = _problem(sens, fixed=fixed, n_time_features=n_time_features, need_layers=need_layers)
    _check_budget(prob, budget)
    if not (_is_int(resolution) and resolution >= 1):
        raise SensitivityError(f"resolution must be a positive integer, got {resolution!r}")
    if not (_is_number(align_weight) and align_weight > 0):
        raise SensitivityError(f"align_weight must be a number > 0, got {align_weight!r}")
    align = _pick_align_metric(prob, align_metric, prob.cand)
    if align is None:
        E, objective = prob.matrix(metric), {}
    else:
        E, objective = _alignment_objective(prob, metric, align, float(align_weight))
    cand = np.array(prob.cand)
    per_weight = np.array([bits_per_level_ideal(int(b), prob.levels) for b in cand])
    C = prob.n[:, None] * per_weight[None, :]
    W = C - C[:, :1]
    cheapest = prob.plan(np.full(len(prob.names), cand[0]))
    slack = budget * prob.n_w - prob.avg_bits(cheapest) * prob.n_w
    if slack < 0:
        raise SensitivityError(
            f"budget {budget} bits is below every layer at {cand[0]} bits ({prob.avg_bits(cheapest):.4f})"
        )
    L, K = E.shape
    R = int(resolution)
    unit = slack * (1 - 1e-9) / R if slack > 0 else 1.0
    if slack > 0:
        Wu = np.ceil(W / unit).astype(np.int64)
    else:
        Wu = np.where(W > 0, R + 1, 0)
    # dp[r] = least error of the layers so far with at most r units spent
    dp = np.zeros(R + 1)
    choice = np.zeros((L, R + 1), dtype=np.int8)
    for i in range(L):
        new = np.full(R + 1, np.inf)
        for k in range(K):
            w = int(Wu[i, k])
            if w > R:
                continue
            val = np.full(R + 1, np.inf)
            val[w:] = dp[: R + 1 - w] + E[i, k]
            better = val < new
            new[better] = val[better]
            choice[i, better] = k
        dp = new
    pick = np.zeros(L, dtype=np.int64)
    r = R
    for i in range(L - 1, -1, -1):
        k = int(choice[i, r])
        pick[i] = k
        r -= int(Wu[i, k])
    # exact feasibility, then spend the rounding remainder greedily on the best error reductions
    plan_bits = cand[pick]
    while prob.avg_bits(prob.plan(plan_bits)) > budget:  # pragma: no cover - guarded by the 1e-9 margin
        i = int(np.argmax(np.where(pick > 0, W[np.arange(L), pick], -1)))
        pick[i] -= 1
        plan_bits = cand[pick]
    greedy_steps = 0
    while True:
        room = slack - float(W[np.arange(L), pick].sum())
        gain = E[np.arange(L), pick][:, None] - E  # error reduction of switching layer i to k
        extra = W - W[np.arange(L), pick][:, None]
        ok = (gain > 0) & (extra <= room)
        if not ok.any():
            break
        i, k = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        trial = pick.copy()
        trial[i] = k
        if prob.avg_bits(prob.plan(cand[trial])) > budget:
            break
        pick = trial
        greedy_steps += 1
    plan_bits = cand[pick]
    total = float(E[np.arange(L), pick].sum())
    bound, lam = _lagrangian_bound(E, W, slack)
    details = {"resolution": R, "greedy_steps": greedy_steps, "objective": total, "lower_bound": bound,
               "lagrange_multiplier": lam, "gap": total - bound,
               "relative_gap": (total - bound) / total if total > 0 else 0.0, **objective}  # fmt: skip
    if align is None:
        method, what = "optimal", f"summed {metric}"
        if align_metric == "auto":
            details["note"] = f"the analysis has no {' or '.join(ALIGN_METRICS)} at every candidate: {metric} alone"
    else:
        method = "optimal-align"
        what = f"normalised summed {metric} + {align_weight:g} x normalised summed {align}"
        details["predicted_align"] = float(np.maximum(prob.matrix(align), 0.0)[np.arange(L), pick].sum())
    notes = (f"optimal allocation: least {what} over bit-widths {prob.cand} within the budget (DP at "
             f"{R} units + greedy fill; Lagrangian bound {bound:.6g}), {_first_last(prob)} 8-bit")
    return _result(prob, method, budget, plan_bits, metric, details, notes)


def allocate(sens, budget: float, method: str = DEFAULT_ALLOCATOR, **kwargs) -> Allocation:
    """Dispatch to :func:`allocate_paper`, :func:`allocate_optimal` (``"optimal"``: the error alone;
    ``"optimal-align"``: with the alignment drop, ``align_metric="auto"``) or :func:`allocate_size_only`."""
    if method == "paper":
        return allocate_paper(sens, budget, **kwargs)
    if method == "optimal":
        return allocate_optimal(sens, budget, **kwargs)
    if method == "optimal-align":
        return allocate_optimal(sens, budget, **{"align_metric": "auto", **kwargs})
    if method == "size-only":
        return allocate_size_only(sens, budget, **kwargs)
    raise SensitivityError(f"unknown allocation method {method!r}; one of {', '.join(METHODS)}")
