"""Is the metric sensitive? Score tiny-sd with every UNet layer fake-quantized, no fine-tuning.

``python -m bfq.tinysd.sensitivity [--n-per-digit 50] [--steps 20]`` prints one row per setting.

This is a *reference check of the metric*, deliberately independent of the project's quantizer
(``bfq.quant.quantizer``, whose output ``bfq eval FILE.bfq`` scores): a plain per-output-channel
symmetric quantizer with the balance integer,
``q = clamp(round(w / s), -2^(n-1), 2^(n-1))`` (2^n + 1 levels; n = 1 is ternary), applied to the
weight of every ``Conv2d`` and ``Linear`` of the UNet, with either

* min-max scales ``s = max|w| / 2^(n-1)``, or
* least-squares scales: 10 rounds of ``s = <w, q> / <q, q>`` starting from min-max.

A useful metric must rank these the obvious way: 4-bit close to fp32, ternary with min-max scales
far worse on both scores. It also shows what alignment alone misses: least-squares scales clip each
channel's largest weights, and on ``conv_in``/``conv_out`` that shifts the image distribution
(FD x3 at 4 bits, alignment unchanged), which is why the paper keeps those two layers at 8 bits;
the ``io_bits`` rows do the same.
"""

from __future__ import annotations

import copy
import json

IO_LAYERS = ("conv_in", "conv_out")
# (name, bits, scales, bits of conv_in/conv_out or None for the same as the rest)
SETTINGS = (
    ("fp32", None, None, None),
    ("4-bit min-max", 4, "minmax", None),
    ("4-bit least-squares", 4, "lsq", None),
    ("4-bit least-squares, io 8-bit", 4, "lsq", 8),
    ("3-bit least-squares", 3, "lsq", None),
    ("2-bit min-max", 2, "minmax", None),
    ("2-bit least-squares", 2, "lsq", None),
    ("ternary min-max", 1, "minmax", None),
    ("ternary least-squares", 1, "lsq", None),
    ("ternary least-squares, io 8-bit", 1, "lsq", 8),
)


def fake_quantize_weight(w, bits: int, scales: str = "minmax", rounds: int = 10):
    """Per-output-channel symmetric fake quantization of one weight tensor (returns a new tensor)."""
    import torch

    top = 2 ** (bits - 1)
    flat = w.detach().reshape(w.shape[0], -1).double()
    s = flat.abs().amax(1, keepdim=True).clamp_min(1e-12) / top
    q = torch.clamp(torch.round(flat / s), -top, top)
    if scales == "lsq":
        for _ in range(rounds):
            s = ((flat * q).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12)
            q = torch.clamp(torch.round(flat / s), -top, top)
    elif scales != "minmax":
        raise ValueError(f"scales must be 'minmax' or 'lsq', not {scales!r}")
    return (s * q).reshape(w.shape).to(w.dtype)


def fake_quantize_unet(unet, bits: int, scales: str = "minmax", io_bits: int | None = None):
    """A copy of ``unet`` with every Conv2d/Linear weight fake-quantized (biases and norms kept).

    ``io_bits``, if given, is the bit width of ``conv_in`` and ``conv_out`` instead of ``bits``.
    """
    import torch

    unet = copy.deepcopy(unet)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                b = io_bits if io_bits is not None and name in IO_LAYERS else bits
                module.weight.copy_(fake_quantize_weight(module.weight, b, scales))
    return unet


def sensitivity_table(n_per_digit: int = 50, steps: int = 20, settings=SETTINGS, **kwargs) -> list[dict]:
    """Evaluate each setting; returns rows ``{"setting", "alignment", "fd", "sweep"}``."""
    from diffusers import UNet2DConditionModel

    from bfq.tinysd import pipeline_dir
    from bfq.tinysd.evaluate import evaluate

    base = UNet2DConditionModel.from_pretrained(str(pipeline_dir() / "unet"), local_files_only=True)
    rows = []
    for name, bits, scales, io_bits in settings:
        unet = base if bits is None else fake_quantize_unet(base, bits, scales, io_bits)
        result = evaluate(unet, n_per_digit=n_per_digit, steps=steps, **kwargs)
        rows.append(dict(setting=name, alignment=result["alignment"], fd=result["fd"], sweep=result["sweep"]))
    return rows


def main(argv=None):
    """Print the sensitivity table (and ``--json``)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-per-digit", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", nargs="*", help="names of the settings to run (default: all)")
    args = parser.parse_args(argv)
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    rows = sensitivity_table(args.n_per_digit, args.steps, settings)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    scales = [r["cfg"] for r in rows[0]["sweep"]]
    print(f"{'setting':<32}" + "".join(f" | cfg {c:<4} align / fd" for c in scales))
    for row in rows:
        cells = "".join(f" | {r['alignment']:>6.3f} / {r['fd']:>6.2f}" for r in row["sweep"])
        print(f"{row['setting']:<32}{cells}")


if __name__ == "__main__":
    main()
