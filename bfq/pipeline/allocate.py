"""Bit allocation to an exact budget from a sensitivity analysis (BITSFUSION.md §3.3, §5.1).

Input: a ``bfq-sensitivity`` object (:mod:`bfq.analyze`, ``spec/sensitivity.schema.json``) that lists
every quantizable layer of a model with its weight count, the measured error of quantizing that
layer alone to each candidate bit-width (1, 2, 3 by default), the layers with fixed bits
(``conv_in``/``conv_out`` at 8) and the accounting constants (N_w, N_tf, level set).

Output: an :class:`Allocation`, which saves as a ``bfq-recipe`` (``spec/recipe.schema.json``) and
reports its average bits by the paper's accounting (§5.1)::

    avg_bits = (Σ_i log2(L_i) · N_i + 16 · N_tf) / N_w

computed exactly as :func:`bfq.recipe.average_bits` and ``bfq inspect`` compute it (same terms,
same order, same N_w = every Linear/Conv weight of the original UNet, same N_tf), so the number an
allocator prints is the number ``bfq inspect`` prints for the file exported with its recipe.

Three allocators:

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
* :func:`allocate_size_only`: a baseline that sees layer sizes but no measurements: Alg. 1 with
  ``M_{i,b}`` replaced by ``4^-b`` (the error a Gaussian-like layer would have) and no refinement, so
  small layers get more bits and large ones fewer.

This module does not import torch (``bfq allocate`` starts fast); :func:`recipe_for_budget`, the
entry point for ``bfq quantize --bits``, imports :mod:`bfq.analyze` (torch) when it is called.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bfq._json import read_json_file
from bfq.errors import RecipeError
from bfq.format import LEVEL_SETS, MAX_BITS, MIN_BITS, bits_per_level_ideal

SENSITIVITY_FORMAT = "bfq-sensitivity"
SENSITIVITY_VERSION = 1
RECIPE_FORMAT = "bfq-recipe"  # = bfq.recipe.RECIPE_FORMAT (not imported: that module imports torch)
RECIPE_VERSION = 1
DEFAULT_ETA = 0.3
DEFAULT_PERCENTILES = (90.0, 95.0, 98.0)
METHODS = ("paper", "optimal", "size-only")
ALIGN_METRICS = ("align_drop", "guidance_err")  # in order of preference for the paper's refinement


class SensitivityError(RecipeError):
    """A sensitivity file is malformed, incomplete, from another model, or cannot meet a budget."""


# ---------------------------------------------------------------------------------- reading


def _summarize(names, limit: int = 5) -> str:
    names = list(names)
    head = ", ".join(str(n) for n in names[:limit])
    return f"{len(names)}: {head}" + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_sensitivity(source) -> dict:
    """Read (a path) or take (a dict) a sensitivity object and check its structure.

    Checks the format, version, accounting constants, layer entries and that every error value is
    a finite number. It does *not* require the analysis to be complete (allocators check the
    entries they need and name what is missing).

    Raises:
        SensitivityError: naming the field or layer that is wrong.
    """
    if isinstance(source, Mapping):
        obj, where = dict(source), "sensitivity"
    else:
        where = os.fspath(source)
        obj = read_json_file(source, SensitivityError, "sensitivity file")
    if not isinstance(obj, dict):
        raise SensitivityError(f"{where}: expected a JSON object")
    if obj.get("format") != SENSITIVITY_FORMAT:
        raise SensitivityError(f"{where}: format must be {SENSITIVITY_FORMAT!r}, got {obj.get('format')!r}")
    if obj.get("version") != SENSITIVITY_VERSION or not _is_int(obj.get("version")):
        raise SensitivityError(f"{where}: version must be {SENSITIVITY_VERSION}, got {obj.get('version')!r}")
    model = obj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        raise SensitivityError(f"{where}: model.fingerprint missing")
    settings = obj.get("settings")
    if not isinstance(settings, dict):
        raise SensitivityError(f"{where}: settings missing")
    bits = settings.get("bits")
    if not (isinstance(bits, list) and bits and all(_is_int(b) and MIN_BITS <= b <= MAX_BITS for b in bits)
            and len(set(bits)) == len(bits)):  # fmt: skip
        raise SensitivityError(f"{where}: settings.bits must be distinct integers in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    acc = obj.get("accounting")
    if not isinstance(acc, dict):
        raise SensitivityError(f"{where}: accounting missing")
    if acc.get("levels") not in LEVEL_SETS:
        raise SensitivityError(f"{where}: accounting.levels must be one of {list(LEVEL_SETS)}, got {acc.get('levels')!r}")
    if not (_is_int(acc.get("n_weights_total")) and acc["n_weights_total"] > 0):
        raise SensitivityError(f"{where}: accounting.n_weights_total must be a positive integer")
    if not (_is_int(acc.get("n_time_features")) and acc["n_time_features"] >= 0):
        raise SensitivityError(f"{where}: accounting.n_time_features must be a non-negative integer")
    layers = obj.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise SensitivityError(f"{where}: layers must be a non-empty object")
    bad_count, bad_fixed, bad_err = [], [], []
    keys = {str(b) for b in bits}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not (_is_int(entry.get("n_weights")) and entry["n_weights"] > 0):
            bad_count.append(name)
            continue
        if "fixed_bits" in entry:
            fb = entry["fixed_bits"]
            if not (_is_int(fb) and MIN_BITS <= fb <= MAX_BITS) or "errors" in entry:
                bad_fixed.append(name)
            continue
        errors = entry.get("errors", {})
        if not isinstance(errors, dict) or not set(errors) <= keys:
            bad_err.append(name)
            continue
        for metrics in errors.values():
            if not isinstance(metrics, dict) or not all(
                _is_number(v) and math.isfinite(v) for v in metrics.values()
            ):
                bad_err.append(name)
                break
    if bad_count:
        raise SensitivityError(f"{where}: layers without a positive integer n_weights ({_summarize(bad_count)})")
    if bad_fixed:
        raise SensitivityError(f"{where}: layers with a bad fixed_bits entry ({_summarize(bad_fixed)})")
    if bad_err:
        raise SensitivityError(
            f"{where}: layers with non-finite (NaN/inf) or malformed errors, or errors for bit-widths not in "
            f"settings.bits {bits} ({_summarize(bad_err)})"
        )
    n_sum = sum(e["n_weights"] for e in layers.values())
    if n_sum > acc["n_weights_total"]:
        raise SensitivityError(
            f"{where}: the layers hold {n_sum} weights, more than accounting.n_weights_total {acc['n_weights_total']}"
        )
    return obj


def check_model(sens: Mapping, fingerprint: Mapping, *, where: str = "sensitivity file") -> None:
    """Raise :class:`SensitivityError` unless ``sens`` was made for the model ``fingerprint`` describes
    (``bfq.analyze.model_fingerprint``): same layer names and shapes, same weights."""
    mine = sens.get("model", {})
    if mine.get("fingerprint") == fingerprint.get("fingerprint"):
        return
    if mine.get("layers_sha256") != fingerprint.get("layers_sha256"):
        theirs = set(sens.get("layers", {}))
        ours = set(fingerprint.get("layer_names", []))
        detail = ""
        if ours:
            missing, unknown = sorted(ours - theirs), sorted(theirs - ours)
            parts = ([f"missing layers {_summarize(missing)}"] if missing else []) + (
                [f"unknown layers {_summarize(unknown)}"] if unknown else []
            )
            detail = "; " + "; ".join(parts) if parts else "; same layer names, different shapes"
        raise SensitivityError(f"{where} is from another model (its layers differ from this model's{detail})")
    raise SensitivityError(
        f"{where} is from another model: same layer names and shapes but different weights "
        f"(fingerprint {mine.get('fingerprint', '?')[:16]} vs {fingerprint.get('fingerprint', '?')[:16]})"
    )


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
        """The paper's average bits, term by term as :func:`bfq.recipe.average_bits` and ``bfq inspect``."""
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
        """A :class:`bfq.recipe.Recipe` (imports torch)."""
        from bfq.recipe import Recipe

        return Recipe.from_json(self.recipe_json())

    def save(self, path) -> Path:
        """Write the recipe JSON atomically (same layout as :meth:`bfq.recipe.Recipe.save`)."""
        return _atomic_write_text(Path(path), json.dumps(self.recipe_json(), indent=1) + "\n")

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


def _atomic_write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
    details = {"metric": metric, **details}
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


def _pick_align_metric(prob: _Problem, align_metric: str | None, top: int) -> str | None:
    if align_metric is None:
        return None
    if align_metric != "auto":
        if not prob.has_metric(align_metric, top):
            raise SensitivityError(f"the sensitivity analysis has no {align_metric!r} at {top} bits for every layer")
        return align_metric
    for m in ALIGN_METRICS:
        if prob.has_metric(m, top):
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
        fixed: extra ``{layer: bits}`` to keep out of the allocation (conv_in/conv_out are fixed by
            the sensitivity file already).
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
             + ", conv_in/conv_out 8-bit")  # fmt: skip
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
    notes = f"size-only baseline: S = 4^-b*N^-{eta:g}, S_o = {s_o:.6g} by bisection, conv_in/conv_out 8-bit"
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


def allocate_optimal(sens, budget: float, *, metric: str = "mse", resolution: int = 20000,
                     fixed: Mapping[str, int] | None = None, n_time_features: int | None = None,
                     need_layers: list[str] | None = None) -> Allocation:  # fmt: skip
    """Minimise the summed measured error ``Σ_i M_{i,b_i}`` subject to ``avg_bits <= budget``.

    Each layer picks one of the measured bit-widths (a multiple-choice knapsack). Exact dynamic
    programming over the slack ``budget·N_w − cost(all layers at the smallest candidate)`` cut into
    ``resolution`` units with each layer's extra cost rounded *up* (so the result never exceeds the
    budget, and is optimal for the rounded costs), then a greedy pass spends the exact slack that
    rounding left. ``details`` holds the Lagrangian lower bound and the resulting optimality gap.
    """
    prob = _problem(sens, fixed=fixed, n_time_features=n_time_features, need_layers=need_layers)
    _check_budget(prob, budget)
    if not (_is_int(resolution) and resolution >= 1):
        raise SensitivityError(f"resolution must be a positive integer, got {resolution!r}")
    E = prob.matrix(metric)
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
               "relative_gap": (total - bound) / total if total > 0 else 0.0}  # fmt: skip
    notes = (f"optimal allocation: least summed {metric} over bit-widths {prob.cand} within the budget (DP at "
             f"{R} units + greedy fill; Lagrangian bound {bound:.6g}), conv_in/conv_out 8-bit")
    return _result(prob, "optimal", budget, plan_bits, metric, details, notes)


def allocate(sens, budget: float, method: str = "paper", **kwargs) -> Allocation:
    """Dispatch to :func:`allocate_paper`, :func:`allocate_optimal` or :func:`allocate_size_only`."""
    if method == "paper":
        return allocate_paper(sens, budget, **kwargs)
    if method == "optimal":
        return allocate_optimal(sens, budget, **kwargs)
    if method == "size-only":
        return allocate_size_only(sens, budget, **kwargs)
    raise SensitivityError(f"unknown allocation method {method!r}; one of {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------ plots


def _block_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0][:-7]}{parts[1]}"  # down0, up2
    if parts[0] == "mid_block":
        return "mid"
    return parts[0].replace(".weight", "")


def layer_kind(name: str) -> str:
    """A coarse layer type for plots: resnet conv, shortcut, sampler, self-attn, cross-attn q/out,
    cross-attn k/v, ff, proj, time proj, first/last."""
    if name in ("conv_in.weight", "conv_out.weight"):
        return "first/last"
    if "time_emb_proj" in name:
        return "time proj"
    if "conv_shortcut" in name:
        return "shortcut"
    if "samplers" in name:
        return "sampler"
    if ".attn1." in name:
        return "self-attn"
    if ".attn2." in name:
        return "cross-attn k/v" if (".to_k." in name or ".to_v." in name) else "cross-attn q/out"
    if ".ff." in name:
        return "ff"
    if "proj_in" in name or "proj_out" in name:
        return "proj"
    return "resnet conv"


KIND_COLORS = {
    "resnet conv": "#4c72b0", "shortcut": "#dd8452", "sampler": "#8c8c8c", "self-attn": "#55a868",
    "cross-attn q/out": "#c44e52", "cross-attn k/v": "#8172b3", "ff": "#937860", "proj": "#da8bc3",
    "time proj": "#ccb974", "first/last": "#222222",
}  # fmt: skip


def unet_order(names) -> list[str]:
    """``names`` reordered along the UNet's data flow: conv_in, down blocks, mid block, up blocks,
    conv_out (diffusers registers ``mid_block`` after ``up_blocks``); stable within a block."""

    def key(item):
        i, n = item
        b = n.split(".")[0]
        rank = {"conv_in": 0, "time_embedding": 0, "down_blocks": 1, "mid_block": 2, "up_blocks": 3}.get(b, 4)
        sub = int(n.split(".")[1]) if b in ("down_blocks", "up_blocks") else 0
        return (rank, sub, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'bfq[plot]' (or pip install matplotlib)") from None
    return matplotlib


def plot_allocation(alloc: Allocation | Mapping, path, *, title: str | None = None) -> Path:
    """Bits per layer across the UNet (down, mid, up), coloured by layer type, with log10 layer
    sizes underneath: the paper's App. H table as a picture. ``alloc`` may be an :class:`Allocation`
    or ``{"bits": {...}, "n_weights": {...}}``. Needs matplotlib."""
    matplotlib = require_matplotlib()

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = alloc.bits if isinstance(alloc, Allocation) else alloc["bits"]
    counts = alloc.n_weights if isinstance(alloc, Allocation) else alloc["n_weights"]
    names = unet_order(list(bits))
    x = np.arange(len(names))
    kinds = [layer_kind(n) for n in names]
    fig_w = min(max(8.0, 0.09 * len(names) + 3), 40.0)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(fig_w, 5.2), sharex=True, height_ratios=(3, 1))
    ax.bar(x, [bits[n] for n in names], width=0.85, color=[KIND_COLORS[k] for k in kinds])
    ax2.bar(x, [math.log10(counts[n]) for n in names], width=0.85, color=[KIND_COLORS[k] for k in kinds])
    blocks = [_block_of(n) for n in names]
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or blocks[i] != blocks[start]:
            if blocks[start] not in ("conv_in", "conv_out"):
                shade = 0.06 if blocks[start].startswith(("down", "up")) and int(blocks[start][-1]) % 2 else 0.0
                shade = 0.12 if blocks[start] == "mid" else shade
                for a in (ax, ax2):
                    a.axvspan(start - 0.5, i - 0.5, color="k", alpha=shade, lw=0)
                ax.text((start + i - 1) / 2, 8.35, blocks[start], ha="center", va="bottom", fontsize=8)
            start = i
    ax.set_ylim(0, 9)
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("bits")
    ax2.set_ylabel("log10 N")
    ax2.set_xlim(-0.7, len(names) - 0.3)
    ax2.set_xticks([])
    ax2.set_xlabel("layers in UNet order (down → mid → up)")
    used = [k for k in KIND_COLORS if k in set(kinds)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in used]
    fig.legend(handles, used, ncol=len(used), fontsize=7, loc="lower center", frameon=False, handlelength=1.0)
    if title is None and isinstance(alloc, Allocation):
        title = f"{alloc.name}: {alloc.avg_bits:.4f} average bits ({alloc.method} allocation)"
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


# ------------------------------------------------------------------------ bfq quantize --bits


def default_cache_dir() -> Path:
    """``$BFQ_CACHE_DIR/sensitivity``, else ``$XDG_CACHE_HOME/bfq/sensitivity``, else ``~/.cache/bfq/sensitivity``."""
    if os.environ.get("BFQ_CACHE_DIR"):
        return Path(os.environ["BFQ_CACHE_DIR"]) / "sensitivity"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bfq" / "sensitivity"


def _settings_key(settings: Mapping) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def analysis_cache_path(unet, *, resolved=None, time_cache: str = "scheduler", levels: str | None = None,
                        cache_dir=None, mode: str = "proxy", analysis_options: Mapping | None = None,
                        fingerprint: Mapping | None = None) -> Path:  # fmt: skip
    """Where :func:`recipe_for_budget` keeps (and looks for) the analysis of ``unet`` with these
    settings: ``<cache_dir>/sensitivity-<fingerprint[:16]>-<settings hash>.json``. ``path.is_file()``
    tells whether ``--bits`` will reuse an analysis or run one (imports torch)."""
    from bfq import analyze as an

    source = getattr(resolved, "source", None)
    fp = fingerprint or an.model_fingerprint(unet, source=source)
    settings = an.analysis_settings(unet, mode=mode, levels=levels or "balanced", time_cache=time_cache,
                                    scheduler=getattr(resolved, "scheduler", None),
                                    base_dir=getattr(resolved, "base_dir", None), source=source,
                                    **dict(analysis_options or {}))  # fmt: skip
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"sensitivity-{fp['fingerprint'][:16]}-{_settings_key(settings)}.json"


def recipe_for_budget(unet, budget: float, *, sensitivity=None, method: str = "paper", resolved=None,
                      time_cache: str = "scheduler", n_time_features: int, levels: str | None = None,
                      time_proj_bits: int | None = None, cache_dir=None, mode: str = "proxy",
                      analysis_options: Mapping | None = None, progress: bool = True,
                      allocator_options: Mapping | None = None):  # fmt: skip
    """The recipe for ``bfq quantize MODEL --bits B``: analysis (reused or run), allocation, checks.

    Args:
        unet: the *float* UNet (before any quantization; its weights are restored after analysis).
        budget: average bits by the paper's accounting.
        sensitivity: a sensitivity file (path) or object to use; None runs the analysis, or reuses
            the one cached in ``cache_dir`` for this model's fingerprint and these settings (a partial
            one is resumed).
        method: "paper" (Alg. 1), "optimal" or "size-only".
        resolved: the :class:`bfq.models.ResolvedModel` (scheduler, pipeline directory and source give
            the analysis its sampler and text conditioning); None analyses the bare UNet (seeded random
            text embeddings, SD's scheduler).
        time_cache, n_time_features, levels, time_proj_bits: as in ``bfq quantize`` (``n_time_features``
            = N_tf of the cache that will be exported, so the accounting matches ``bfq inspect``).
            In grid mode ``time_proj_bits`` fixes the time projections; without it they are allocated.
        cache_dir: where analyses are cached (default :func:`default_cache_dir`); the lead passes the
            ``--work-dir`` when there is one.
        mode: analysis mode when one has to be run ("proxy" or "image").
        analysis_options: extra keyword arguments for :func:`bfq.analyze.analyze`.
        allocator_options: extra keyword arguments for the allocator (e.g. ``{"eta": 0.3}``).
    Returns:
        ``(recipe, why)``: a validated :class:`bfq.recipe.Recipe` and one sentence for the notes.
    Raises:
        RecipeError / SensitivityError: bad budget, sensitivity file from another model, missing
        layers, NaN errors, incompatible settings.
    """
    from bfq import analyze as an
    from bfq import recipe as recipes

    if method not in METHODS:
        raise SensitivityError(f"unknown allocation method {method!r}; one of {', '.join(METHODS)}")
    if not _is_number(budget) or not math.isfinite(budget):
        raise SensitivityError(f"the bit budget must be a finite number, got {budget!r}")
    levels = levels or "balanced"
    need = list(recipes.quantizable_layers(unet, time_cache))
    source = getattr(resolved, "source", None)
    fp = an.model_fingerprint(unet, source=source)
    if sensitivity is not None:
        sens = load_sensitivity(sensitivity)
        where = "the sensitivity file" if isinstance(sensitivity, Mapping) else f"sensitivity file {os.fspath(sensitivity)}"
        check_model(sens, fp, where=where)
        origin = "given" if isinstance(sensitivity, Mapping) else os.fspath(sensitivity)
    else:
        opts = dict(analysis_options or {})
        scheduler = getattr(resolved, "scheduler", None)
        base_dir = getattr(resolved, "base_dir", None)
        path = analysis_cache_path(unet, resolved=resolved, time_cache=time_cache, levels=levels, cache_dir=cache_dir,
                                   mode=mode, analysis_options=opts, fingerprint=fp)  # fmt: skip
        sens = an.analyze(unet, out=path, mode=mode, levels=levels, time_cache=time_cache, scheduler=scheduler,
                          base_dir=base_dir, source=source, n_time_features=n_time_features, progress=progress,
                          **opts)  # fmt: skip
        origin = str(path)
    if sens["accounting"]["levels"] != levels:
        raise SensitivityError(
            f"the sensitivity analysis measured {sens['accounting']['levels']} levels, but {levels} levels were asked for"
        )
    fixed = {}
    if time_cache == "grid" and time_proj_bits is not None:
        fixed = {n: int(time_proj_bits) for n in need if n.endswith("time_emb_proj.weight")}
    alloc = allocate(sens, budget, method, fixed=fixed, n_time_features=n_time_features, need_layers=need,
                     **dict(allocator_options or {}))  # fmt: skip
    recipe = alloc.to_recipe()
    recipes.validate(recipe, unet, time_cache)
    why = (f"{method} allocation for {budget:g} bits from the sensitivity analysis {origin} "
           f"({sens['settings'].get('mode', '?')} mode): {alloc.avg_bits:.4f} bits by the paper's accounting")  # fmt: skip
    return recipe, why


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically (PNG at 110 dpi by the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
