"""bfq.pipeline.allocate: the paper's Alg. 1 with a bisected threshold, the optimal (knapsack) allocator and
the size-only baseline, on synthetic sensitivity files checked against brute force; bad inputs; CLI."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from bfq.format.constants import bits_per_level_ideal
from bfq.pipeline.allocate import (
    DEFAULT_ALLOCATOR,
    allocate,
    allocate_optimal,
    allocate_paper,
    allocate_size_only,
)
from bfq.pipeline.plots import unet_order
from bfq.pipeline.sensitivity import SensitivityError, check_model, load_sensitivity

ROOT = Path(__file__).resolve().parent.parent
SENS_SCHEMA = json.loads((ROOT / "spec" / "sensitivity.schema.json").read_text())
RECIPE_SCHEMA = json.loads((ROOT / "spec" / "recipe.schema.json").read_text())


def synthetic(seed: int = 0, n_layers: int = 6, bits=(1, 2, 3), n_tf: int = 40, levels: str = "balanced",
              align: bool = True, sizes=None) -> dict:  # fmt: skip
    """A sensitivity object: conv_in/conv_out fixed at 8, n_layers random layers with errors that fall
    with bits (roughly /4 per bit), sizes 16..4096, and N_w including 500 'time layer' weights."""
    rng = np.random.default_rng(seed)
    layers = {"conv_in.weight": {"n_weights": 72, "fixed_bits": 8}}
    for i in range(n_layers):
        n = int(sizes[i]) if sizes is not None else int(rng.integers(16, 4096))
        base = float(rng.lognormal(0, 1))
        errors = {}
        for b in bits:
            e = {"mse": base * 4.0 ** (-b) * float(rng.uniform(0.7, 1.3))}
            if align:
                e["align_drop"] = float(rng.normal(0.01, 0.02)) / b
            errors[str(b)] = e
        layers[f"down_blocks.0.layer{i}.weight"] = {"n_weights": n, "errors": errors}
    layers["conv_out.weight"] = {"n_weights": 72, "fixed_bits": 8}
    n_w = sum(e["n_weights"] for e in layers.values()) + 500
    return {
        "format": "bfq-sensitivity", "version": 1,
        "model": {"fingerprint": f"{seed:064x}", "layers_sha256": "a" * 64, "weights_sha256": "b" * 64},
        "settings": {"mode": "proxy", "bits": list(bits), "levels": levels, "seed": 0},
        "accounting": {"time_cache": "scheduler", "levels": levels, "n_weights_total": n_w, "n_time_features": n_tf},
        "layers": layers,
    }  # fmt: skip


def _names(sens):
    return [n for n, e in sens["layers"].items() if "errors" in e]


def _avg(sens, plan):
    acc = sens["accounting"]
    total = sum(bits_per_level_ideal(b, acc["levels"]) * sens["layers"][n]["n_weights"] for n, b in plan.items())
    return (total + 16.0 * acc["n_time_features"]) / acc["n_weights_total"]


def _plan(sens, chosen):
    return {n: e.get("fixed_bits", chosen.get(n)) for n, e in sens["layers"].items()}


def _budget_range(sens):
    names = _names(sens)
    return _avg(sens, _plan(sens, dict.fromkeys(names, 1))), _avg(sens, _plan(sens, dict.fromkeys(names, 3)))


def test_synthetic_files_match_the_schema():
    jsonschema.Draft202012Validator.check_schema(SENS_SCHEMA)
    jsonschema.validate(synthetic(), SENS_SCHEMA)


def test_accounting_is_bfq_recipe_average_bits_exactly():
    from bfq.quant.recipe import average_bits

    for seed in range(5):
        sens = synthetic(seed, levels="plain" if seed % 2 else "balanced")
        lo, hi = _budget_range(sens)
        for method in ("paper", "optimal", "size-only"):
            a = allocate(sens, (lo + hi) / 2, method, **({"align_metric": None} if method == "paper" else {}))
            counts = {n: e["n_weights"] for n, e in sens["layers"].items()}
            acc = sens["accounting"]
            ref = average_bits(a.bits, counts, acc["levels"], acc["n_time_features"], acc["n_weights_total"])
            assert a.avg_bits == ref  # bit for bit: same terms, same order
            assert list(a.bits) == list(sens["layers"])  # model order, fixed layers included
            assert a.bits["conv_in.weight"] == a.bits["conv_out.weight"] == 8


def _paper_bits(sens, s_o, eta, add):
    """Alg. 1 literally: start at 4, loop b = 3..1, overwrite when S < S_o; then + add."""
    out = {}
    for i, n in enumerate(_names(sens)):
        N = sens["layers"][n]["n_weights"]
        b_star = 4
        for b in (3, 2, 1):
            if sens["layers"][n]["errors"][str(b)]["mse"] * N ** (-eta) < s_o:
                b_star = b
        out[n] = min(b_star + add[i], 8)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_paper_threshold_gives_the_largest_average_within_budget(seed):
    sens = synthetic(seed, n_layers=7)
    names = _names(sens)
    S = sorted({e["errors"][str(b)]["mse"] * e["n_weights"] ** -0.3 for e in sens["layers"].values() if "errors" in e
                for b in (1, 2, 3)})  # fmt: skip
    # every plan Alg. 1 can produce (thresholds just above each S value, and below all)
    thresholds = [S[0] / 2] + [s * (1 + 1e-12) for s in S]
    plans = [_paper_bits(sens, t, 0.3, [0] * len(names)) for t in thresholds]
    avgs = [_avg(sens, _plan(sens, p)) for p in plans]
    lo, hi = min(avgs), max(avgs)
    rng = np.random.default_rng(seed)
    for budget in list(rng.uniform(lo, hi, 6)) + [lo, hi, hi + 0.3]:
        a = allocate_paper(sens, float(budget), align_metric=None)
        best = max(v for v in avgs if v <= budget)
        assert a.avg_bits == pytest.approx(best, abs=1e-12)
        assert a.avg_bits <= budget
        # the reported threshold reproduces the plan under the paper's literal rule
        assert _plan(sens, _paper_bits(sens, a.details["threshold"], 0.3, [0] * len(names))) == a.bits


def test_paper_refinement_adds_bits_above_percentiles():
    sens = synthetic(3, n_layers=50)
    names = _names(sens)
    drops = np.linspace(0, 1, len(names))  # distinct, increasing
    for n, d in zip(names, drops):
        sens["layers"][n]["errors"]["3"]["align_drop"] = float(d)
    lo, hi = _budget_range(sens)
    top = _avg(sens, _plan(sens, dict.fromkeys(names, 8)))  # above both ceilings: every layer at 4 + refinement
    a = allocate_paper(sens, top)
    plain = allocate_paper(sens, top, align_metric=None)
    assert set(plain.bits[n] for n in names) == {4}
    add = [a.bits[n] - plain.bits[n] for n in names]
    expect = [int(d > np.percentile(drops, 90)) + int(d > np.percentile(drops, 95)) + int(d > np.percentile(drops, 98))
              for d in drops]  # fmt: skip
    assert add == expect and max(add) == 3
    assert a.details["refined_layers"] == sum(1 for x in expect if x)
    # the same refinement is applied inside the bisection: a budget in the middle is still met
    mid = (a.details["ceiling_avg_bits"] + lo) / 2 + 0.2
    b = allocate_paper(sens, mid)
    assert b.avg_bits <= mid and b.details["align_metric"] == "align_drop"


def _brute_optimum(sens, budget, metric="mse"):
    names = _names(sens)
    cand = sens["settings"]["bits"]
    best = (math.inf, None)
    for combo in itertools.product(cand, repeat=len(names)):
        chosen = dict(zip(names, combo))
        if _avg(sens, _plan(sens, chosen)) <= budget:
            err = sum(sens["layers"][n]["errors"][str(b)][metric] for n, b in chosen.items())
            best = min(best, (err, combo), key=lambda x: x[0])
    return best[0]


@pytest.mark.parametrize("seed", range(10))
def test_optimal_matches_brute_force(seed):
    sens = synthetic(100 + seed, n_layers=6)
    lo, hi = _budget_range(sens)
    rng = np.random.default_rng(seed)
    for budget in rng.uniform(lo, hi, 4):
        a = allocate_optimal(sens, float(budget), resolution=50000)
        opt = _brute_optimum(sens, budget)
        assert a.avg_bits <= budget
        assert a.predicted_error == pytest.approx(a.details["objective"])
        assert a.details["lower_bound"] <= a.details["objective"] + 1e-12
        assert a.details["lower_bound"] <= opt + 1e-12
        # exact up to the budget discretisation: never worse than the optimum of a budget shrunk by it
        slack_units = 6 * (budget - lo) / 50000
        assert opt - 1e-12 <= a.predicted_error <= _brute_optimum(sens, budget - slack_units) + 1e-12
        assert a.predicted_error == pytest.approx(opt, rel=1e-9)  # in practice: the optimum


def test_optimal_beats_or_ties_every_other_feasible_plan():
    sens = synthetic(7, n_layers=40)
    lo, hi = _budget_range(sens)
    budget = lo + 0.4 * (hi - lo)
    opt = allocate_optimal(sens, budget)
    size = allocate_size_only(sens, budget)
    paper = allocate_paper(sens, budget, align_metric=None, max_bits=3)  # measured bits only
    assert opt.predicted_error <= paper.predicted_error + 1e-12
    assert opt.predicted_error <= size.predicted_error + 1e-12
    assert opt.details["relative_gap"] < 0.05


def _starved_to_k(seed: int = 3, n_layers: int = 6) -> tuple[dict, str]:
    """A sensitivity file with one small "cross-attention to_k" whose image error is tiny at every
    bit-width but whose alignment drop at 1 and 2 bits is the largest of all (the paper's Obs. 2)."""
    sens = synthetic(seed, n_layers=n_layers)
    name = _names(sens)[0]
    sens["layers"][name]["n_weights"] = 256
    for b, drop in (("1", 0.2), ("2", 0.05), ("3", 0.001)):
        sens["layers"][name]["errors"][b] = {"mse": 1e-6 / int(b), "align_drop": drop}
    return sens, name


def test_default_allocator_protects_the_layer_mse_misses():
    """Issue 14 defect 4: the error-only knapsack gives such a layer the fewest bits; the default
    (the knapsack on error + alignment drop) spends bits on it."""
    sens, to_k = _starved_to_k()
    lo, hi = _budget_range(sens)
    budget = lo + 0.3 * (hi - lo)
    mse_only = allocate_optimal(sens, budget)
    assert mse_only.bits[to_k] == 1
    default = allocate(sens, budget)
    assert DEFAULT_ALLOCATOR == "optimal-align" and default.method == "optimal-align"
    assert default.bits[to_k] == 3 and default.avg_bits <= budget
    assert default.details["align_metric"] == "align_drop"
    assert default.details["predicted_align"] < mse_only.details.get("predicted_align", 0.2)
    assert default.predicted_error >= mse_only.predicted_error  # it pays in image error, as it should


@pytest.mark.parametrize("seed", range(4))
def test_optimal_align_matches_brute_force_on_its_objective(seed):
    sens = synthetic(200 + seed, n_layers=6)
    names = _names(sens)
    mse = {n: {b: e["mse"] for b, e in sens["layers"][n]["errors"].items()} for n in names}
    drop = {n: {b: max(e["align_drop"], 0.0) for b, e in sens["layers"][n]["errors"].items()} for n in names}
    norm_m, norm_a = sum(mse[n]["1"] for n in names), sum(drop[n]["1"] for n in names)
    for n in names:
        for b in mse[n]:
            sens["layers"][n]["errors"][b]["combined"] = mse[n][b] / norm_m + 2.0 * drop[n][b] / norm_a
    lo, hi = _budget_range(sens)
    for budget in np.random.default_rng(seed).uniform(lo, hi, 3):
        a = allocate(sens, float(budget), "optimal-align", align_weight=2.0, resolution=50000)
        assert a.avg_bits <= budget
        assert a.details["objective"] == pytest.approx(_brute_optimum(sens, budget, "combined"), rel=1e-9)


def test_optimal_align_without_an_alignment_measure_says_so():
    sens = synthetic(4, align=False)
    lo, hi = _budget_range(sens)
    a = allocate(sens, (lo + hi) / 2, "optimal-align")
    b = allocate_optimal(sens, (lo + hi) / 2)
    assert a.method == "optimal" and a.bits == b.bits and "mse alone" in a.details["note"]
    with pytest.raises(SensitivityError, match="align_weight"):
        allocate(sens, (lo + hi) / 2, "optimal-align", align_weight=0)


def test_one_default_allocator_for_allocate_and_quantize():
    from bfq_cli.allocate_cmd import allocate_cmd
    from bfq_cli.main import main

    defaults = {p.name: p.default for p in allocate_cmd.params}
    quantize_defaults = {p.name: p.default for p in main.commands["quantize"].params}
    assert defaults["method"] == quantize_defaults["allocator"] == DEFAULT_ALLOCATOR


def test_size_only_gives_small_layers_more_bits():
    sizes = [16, 64, 256, 1024, 4096, 16384, 65536, 262144]
    sens = synthetic(1, n_layers=len(sizes), sizes=sizes)
    lo, hi = _budget_range(sens)
    a = allocate_size_only(sens, (lo + hi) / 2)
    bits = [a.bits[n] for n in _names(sens)]
    assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]
    # measurements are ignored: an unfinished analysis is fine
    for e in sens["layers"].values():
        e.get("errors", {}).clear()
    assert allocate_size_only(sens, (lo + hi) / 2).bits == a.bits


def test_budget_is_met_without_exceeding_across_budgets():
    sens = synthetic(11, n_layers=30)
    lo, hi = _budget_range(sens)
    for budget in np.linspace(lo, hi, 15):
        for method in ("optimal", "size-only"):
            assert allocate(sens, float(budget), method).avg_bits <= budget
        assert allocate(sens, float(budget), "paper", align_metric=None).avg_bits <= budget
    # optimal leaves less than one cheapest upgrade of room
    a = allocate_optimal(sens, (lo + hi) / 2)
    room = ((lo + hi) / 2 - a.avg_bits) * sens["accounting"]["n_weights_total"]
    ups = [sens["layers"][n]["n_weights"] * (bits_per_level_ideal(b + 1, "balanced") - bits_per_level_ideal(b, "balanced"))
           for n, b in a.bits.items() if "errors" in sens["layers"][n] and b < 3]  # fmt: skip
    assert not ups or room < max(ups)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update(format="x"), "format"),
        (lambda s: s.update(version=2), "version"),
        (lambda s: s["layers"]["down_blocks.0.layer1.weight"]["errors"]["2"].update(mse=float("nan")), "non-finite"),
        (lambda s: s["layers"]["down_blocks.0.layer1.weight"]["errors"]["2"].update(mse=float("inf")), "non-finite"),
        (lambda s: s["layers"]["down_blocks.0.layer1.weight"].update(n_weights=0), "n_weights"),
        (lambda s: s["accounting"].update(n_weights_total=10), "n_weights_total"),
        (lambda s: s["settings"].update(bits=[1, 1]), "settings.bits"),
    ],
)
def test_malformed_files_are_refused(mutate, message):
    sens = synthetic()
    mutate(sens)
    with pytest.raises(SensitivityError, match=message):
        allocate_paper(sens, 3.0)


def test_missing_entries_and_layers_are_named():
    sens = synthetic()
    del sens["layers"]["down_blocks.0.layer2.weight"]["errors"]["3"]
    lo, hi = _budget_range(synthetic())
    with pytest.raises(SensitivityError, match=r"layer2\.weight@3.*incomplete"):
        allocate_paper(sens, (lo + hi) / 2)
    with pytest.raises(SensitivityError, match=r"layer2\.weight@3"):
        allocate_optimal(sens, (lo + hi) / 2)
    need = list(synthetic()["layers"]) + ["up_blocks.0.extra.weight"]
    with pytest.raises(SensitivityError, match=r"missing layers 1: up_blocks\.0\.extra\.weight"):
        allocate_size_only(synthetic(), (lo + hi) / 2, need_layers=need)


def test_impossible_budgets_name_the_limits():
    sens = synthetic()
    lo, hi = _budget_range(sens)
    all8 = _avg(sens, _plan(sens, dict.fromkeys(_names(sens), 8)))
    for method in ("paper", "optimal", "size-only"):
        with pytest.raises(SensitivityError, match=r"below what all-1-bit reaches .*" + f"{lo:.4f}"):
            allocate(sens, lo - 1e-6, method)
        with pytest.raises(SensitivityError, match=r"above what all-8-bit reaches .*" + f"{all8:.4f}"):
            allocate(sens, all8 + 1e-6, method)
        with pytest.raises(SensitivityError, match="finite"):
            allocate(sens, float("nan"), method)
    # the refinement's extra bits make the paper's floor higher than all-1-bit
    sens["layers"]["down_blocks.0.layer0.weight"]["errors"]["3"]["align_drop"] = 10.0
    with pytest.raises(SensitivityError, match="below what the paper's allocator reaches"):
        allocate_paper(sens, lo + 1e-9)
    assert allocate_paper(sens, lo + 1e-9, align_metric=None).avg_bits <= lo + 1e-9


def test_check_model_names_the_difference():
    sens = synthetic()
    same = {"fingerprint": sens["model"]["fingerprint"]}
    check_model(sens, same)
    with pytest.raises(SensitivityError, match="another model.*different weights"):
        check_model(sens, {"fingerprint": "f" * 64, "layers_sha256": "a" * 64})
    with pytest.raises(SensitivityError, match=r"another model.*missing layers 1: x\.weight"):
        check_model(sens, {"fingerprint": "f" * 64, "layers_sha256": "c" * 64, "layer_names": [*sens["layers"], "x.weight"]})


def test_unet_order_puts_mid_between_down_and_up():
    names = ["conv_in.weight", "down_blocks.1.a.weight", "down_blocks.0.a.weight", "up_blocks.0.a.weight",
             "mid_block.a.weight", "conv_out.weight"]  # fmt: skip
    assert unet_order(names) == ["conv_in.weight", "down_blocks.0.a.weight", "down_blocks.1.a.weight",
                                 "mid_block.a.weight", "up_blocks.0.a.weight", "conv_out.weight"]  # fmt: skip


def test_import_is_torch_free():
    code = "import sys, bfq.pipeline.allocate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_allocate_writes_recipe_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from bfq_cli.main import main

    from bfq.pipeline.allocate import DEFAULT_ALLOCATOR
    from bfq.quant.recipe import Recipe

    sens = synthetic(5, n_layers=12)
    path = tmp_path / "sens.json"
    path.write_text(json.dumps(sens))
    lo, hi = _budget_range(sens)
    budget = round((lo + hi) / 2, 3)
    runner = CliRunner()
    out, plot = tmp_path / "recipe.json", tmp_path / "bits.png"
    r = runner.invoke(main, ["allocate", str(path), "--bits", str(budget), "-o", str(out), "--plot", str(plot), "--compare"])
    assert r.exit_code == 0, r.output
    assert "by the paper's accounting" in r.output and "compare     paper" in r.output
    recipe = Recipe.load(out)
    assert recipe.name == f"alloc-{DEFAULT_ALLOCATOR}-{budget:g}"  # the default method, as bfq quantize's
    jsonschema.validate(json.loads(out.read_text()), RECIPE_SCHEMA)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(main, ["allocate", str(path), "--bits", str(budget), "--method", "optimal", "--json"])
    summary = json.loads(r.output)
    assert summary["avg_bits"] <= budget and summary["method"] == "optimal"


def test_cli_allocate_bad_input_writes_nothing(tmp_path):
    from bfq_cli.main import main

    sens = synthetic()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(sens))
    sens["layers"]["down_blocks.0.layer0.weight"]["errors"]["1"]["mse"] = float("nan")
    bad.write_text(json.dumps(sens))  # json writes NaN; the reader must refuse it
    runner = CliRunner()
    out = tmp_path / "r.json"
    plot = ["--plot", str(tmp_path / "p.png")] if importlib.util.find_spec("matplotlib") else []
    for args, message in (
        ([str(good), "--bits", "0.5"], "below what all-1-bit reaches"),
        ([str(good), "--bits", "9"], "above what all-8-bit reaches"),
        ([str(bad), "--bits", "3"], "non-finite"),
    ):
        r = runner.invoke(main, ["allocate", *args, "-o", str(out), *plot])
        assert r.exit_code == 2 and message in r.output, r.output
        assert r.output.startswith("bfq: error: ") and r.output.count("\n") == 1
        assert not out.exists() and not (tmp_path / "p.png").exists()


def test_load_sensitivity_refuses_duplicate_keys_and_bad_json(tmp_path):
    p = tmp_path / "s.json"
    p.write_text('{"format": "bfq-sensitivity", "format": "bfq-sensitivity"}')
    with pytest.raises(SensitivityError, match="duplicate key"):
        load_sensitivity(p)
    p.write_text("{")
    with pytest.raises(SensitivityError, match="invalid JSON"):
        load_sensitivity(p)
    with pytest.raises(SensitivityError, match="cannot read"):
        load_sensitivity(tmp_path / "missing.json")
