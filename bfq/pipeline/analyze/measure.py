"""How an analysis measures one candidate: the proxy set and reference predictions, the reference
images, the alignment scorers, the fake-quantized (optionally fine-tuned) weight of one layer, and
local mode's recorded layer inputs and output gradients. It is one cohesive thing: every way a candidate
becomes numbers, all built on the same proxy set and conditioning (:class:`_Context`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bfq.families import family_of
from bfq.pipeline.analyze.settings import (
    RANDOM_SEQ_LEN,
    SD_SCHEDULER,
)
from bfq.pipeline.sensitivity import SensitivityError


def _ddim(sched_cfg: Mapping, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**SD_SCHEDULER, **dict(sched_cfg)}, clip_sample=False)
    sched.set_timesteps(steps)
    return sched


# Conditioning is a flat dict of batch-first tensors: "encoder_hidden_states" and whatever the
# family adds (SDXL: "text_embeds", "time_ids"; PixArt: "encoder_attention_mask"), so that it is
# sliced, repeated and joined like one tensor (Family.flat_conditioning, Family.model_kwargs).
def _cond_kwargs(family, cond: dict) -> dict:
    """The model keyword arguments of a flat conditioning dict."""
    return family.model_kwargs(cond)


def _cond_map(cond: dict, fn) -> dict:
    return {k: fn(v) for k, v in cond.items()}


def _cond_cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _cond_expand(cond: dict, n: int) -> dict:
    return _cond_map(cond, lambda v: v.expand(n, *v.shape[1:]))


def _cond_repeat(cond: dict, n: int) -> dict:
    return _cond_map(cond, lambda v: v.repeat(n, *[1] * (v.dim() - 1)))


def _forward(unet, x, t, cond: dict, idx) -> torch.Tensor:
    family = family_of(unet)
    return family.forward(unet, x[idx], t[idx], _cond_kwargs(family, _cond_map(cond, lambda v: v[idx])))


@torch.no_grad()
def _predict(unet, x, t, emb: dict, batch_size: int) -> torch.Tensor:
    """The model's noise prediction for ``x`` at ``t`` (one per sample) in chunks of ``batch_size``."""
    return torch.cat([_forward(unet, x, t, emb, slice(i, i + batch_size)) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def _sample(unet, cond, uncond, sched_cfg, steps, guidance, x_T, batch_size, record=()):
    """DDIM (eta 0) with CFG from ``x_T``; returns the final latents and ``[(step index, t, x_t)]``."""
    sched = _ddim(sched_cfg, steps)
    x = x_T * sched.init_noise_sigma
    P = x.shape[0]
    emb = _cond_cat(_cond_expand(uncond, P), cond)
    states = []
    for i, t in enumerate(sched.timesteps):
        if i in record:
            states.append((i, int(t), x.clone()))
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        tt = torch.full((2 * P,), int(t), device=x.device, dtype=torch.long)
        eps = _predict(unet, xin, tt, emb, batch_size)
        eu, ec = eps.chunk(2)
        x = sched.step(eu + guidance * (ec - eu), t, x).prev_sample
    return x, states


class _Context:
    """Conditioning, fixed sets and scorers for one analysis (built once per run)."""

    def __init__(self, unet, settings: dict, base_dir, device, batch_size: int):
        self.unet, self.s, self.base_dir, self.device, self.bs = unet, settings, base_dir, device, batch_size
        cfg = unet.config
        size = settings.get("resolution", cfg.sample_size)  # local mode records at a small size
        self.shape = (cfg.in_channels, size, size)
        self.dtype = next(unet.parameters()).dtype
        cond, uncond = self._conditioning()
        self.cond = _cond_map(cond, lambda v: v.to(self.device, self.dtype))
        self.uncond = _cond_map(uncond, lambda v: v.to(self.device, self.dtype))

    def _conditioning(self) -> tuple[dict, dict]:
        s = self.s
        family, config = family_of(self.unet), dict(self.unet.config)
        dim = family.text_width(config)
        if s["conditioning"] == "random":
            g = torch.Generator().manual_seed(s["seed"] + 7919)
            cond = family.conditioning(config, s["n_prompts"], seq_len=RANDOM_SEQ_LEN, generator=g)
            uncond = family.conditioning(config, 1, seq_len=RANDOM_SEQ_LEN, generator=g)
            return family.flat_conditioning(cond), family.flat_conditioning(uncond)
        cond, uncond = family.drop_padding(*(family.flat_conditioning(family.encode_prompts(self.base_dir, texts, config,
                                                                                           self.device))
                                             for texts in (list(s["prompts"]), [""])))  # fmt: skip
        width = cond["encoder_hidden_states"].shape[-1]
        if width != dim:
            raise SensitivityError(f"text encoder width {width} != the width of text features the model takes, {dim}")
        return cond, uncond

    def initial_noise(self, offset: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.s["seed"] + offset)
        return torch.randn(self.s["n_prompts"], *self.shape, generator=g).to(self.device, self.dtype)

    # ---- proxy mode: fixed (x_t, t, embedding) set
    def build_proxy(self):
        s = self.s
        record = sorted({int(round(v)) for v in np.linspace(0, s["steps"] - 1, s["n_timesteps"])})
        _, states = _sample(self.unet, self.cond, self.uncond, s["scheduler"], s["steps"], s["guidance"],
                            self.initial_noise(), self.bs, record)  # fmt: skip
        x = torch.cat([st[2] for st in states])
        t = torch.tensor([st[1] for st in states for _ in range(s["n_prompts"])], device=self.device)
        cond = _cond_repeat(self.cond, len(states))
        self.proxy_inputs = self._cfg_batch(x, t, cond)
        self.proxy_timesteps = [st[1] for st in states]
        self.ref = self.proxy_outputs()
        return self.ref

    def _cfg_batch(self, x, t, cond):
        n = x.shape[0]
        return (torch.cat([x, x]), torch.cat([t, t]), _cond_cat(_cond_expand(self.uncond, n), cond))

    def proxy_outputs(self):
        x, t, e = self.proxy_inputs
        eps = _predict(self.unet, x, t, e, self.bs).double()
        eu, ec = eps.chunk(2)
        return {"guided": eu + self.s["guidance"] * (ec - eu), "direction": ec - eu}

    def proxy_metrics(self, out) -> dict:
        g_ref, d_ref = self.ref["guided"], self.ref["direction"]
        mse = float(((out["guided"] - g_ref) ** 2).mean())
        power = float((g_ref**2).mean())
        derr = float(((out["direction"] - d_ref) ** 2).sum() / (d_ref**2).sum().clamp_min(1e-300))
        return {"mse": mse, "snr_db": _db(power, mse), "guidance_err": derr}

    # ---- image mode
    def build_image(self):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(Path(self.base_dir) / "vae", local_files_only=True).to(self.device).eval()
        self.scorer = _scorer(self.s, self.device)
        self.x_T = self.initial_noise()
        images = self.images()
        self.ref = {"images": images, "align": self.scorer(images) if self.scorer else None}
        return self.ref

    @torch.no_grad()
    def images(self) -> np.ndarray:
        s = self.s
        lat, _ = _sample(self.unet, self.cond, self.uncond, s["scheduler"], s["steps"], s["guidance"], self.x_T, self.bs)
        out = []
        sf = self.vae.config.scaling_factor
        for i in range(0, lat.shape[0], self.bs):
            img = self.vae.decode((lat[i : i + self.bs] / sf).to(self.vae.dtype)).sample
            out.append((img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def image_metrics(self, images) -> dict:
        mse = float((((images - self.ref["images"]) * 255.0) ** 2).mean())
        out = {"mse": mse, "psnr": _db(255.0**2, mse)}
        if self.scorer is not None:
            out["align_drop"] = float(self.ref["align"].mean() - self.scorer(images).mean())
        return out

    # ---- fine-tuning set: fp noise predictions on states of other trajectories
    def build_train(self):
        s = self.s
        record = range(s["steps"])
        _, states = _sample(self.unet, self.cond, self.uncond, s["scheduler"], s["steps"], s["guidance"],
                            self.initial_noise(offset=1), self.bs, record)  # fmt: skip
        x = torch.cat([st[2] for st in states])
        t = torch.tensor([st[1] for st in states for _ in range(s["n_prompts"])], device=self.device)
        x, t, e = self._cfg_batch(x, t, _cond_repeat(self.cond, len(states)))
        self.train_set = (x, t, e, _predict(self.unet, x, t, e, self.bs))
        self.train_gen = torch.Generator().manual_seed(s["seed"] + 2)


def _db(power: float, mse: float) -> float:
    if mse <= 0:
        return 200.0
    return float(min(200.0, 10.0 * math.log10(max(power, 1e-300) / mse)))


def _scorer(settings: dict, device):
    align = settings.get("align")
    if align is None:
        return None
    if align == "digit-classifier":
        from bfq.tinysd.classifier import load_classifier
        from bfq.tinysd.data import eval_prompts

        clf = load_classifier()
        per_digit = -(-settings["n_prompts"] // 10)
        allp = eval_prompts(per_digit, settings["seed"])
        digits = [allp[d * per_digit + j].digit for j in range(per_digit) for d in range(10)][: settings["n_prompts"]]
        return _DigitScorer(clf, np.array(digits))
    return _ClipScorer(align[len("clip:") :], settings["prompts"], device)


class _DigitScorer:
    """Probability the digit classifier gives the prompted digit (a smooth alignment score)."""

    def __init__(self, clf, digits):
        self.clf, self.digits = clf, digits

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch.nn.functional as F

        from bfq.tinysd.data import IMAGE_SIZE

        x = torch.as_tensor(images.mean(-1), dtype=torch.float32)[:, None]
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        logits, _ = self.clf.model(x)
        p = torch.softmax(logits.double(), 1).numpy()
        return p[np.arange(len(p)), self.digits]


class _ClipScorer:
    """CLIP image-text cosine similarity (transformers ``CLIPModel`` from a local directory)."""

    def __init__(self, path, prompts, device):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.prompts, self.device = list(prompts), device

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        pil = [(img * 255).round().clip(0, 255).astype(np.uint8) for img in images]
        inputs = self.proc(text=self.prompts, images=pil, return_tensors="pt", padding=True, truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        a = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
        b = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
        return (a * b).sum(-1).cpu().numpy()


# ------------------------------------------------------------------------------ candidates


def _module(unet, name: str) -> nn.Module:
    return unet.get_submodule(name[: -len(".weight")])


def _fake_weight(mod: nn.Module, bits: int, levels: str, scale_dtype: str, iters: int) -> torch.Tensor:
    """The fake-quantized weight ``bfq quantize`` would export for this layer at ``bits`` (T = 0)."""
    from bfq.quant.nn import QuantConv2d, QuantLinear

    cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
    q = cls.from_float(mod, bits, levels=levels, scale_dtype=scale_dtype, init="alternating", iters=iters)
    with torch.no_grad():
        return q.fake_weight().detach().clone()


def _finetuned_weight(ctx: _Context, name: str, mod: nn.Module, bits: int) -> torch.Tensor:
    """Quantize ``mod`` (a copy), train its latent weight and scale for T steps so that the UNet's
    noise prediction matches the fp one on the training set; return the trained fake weight."""
    from bfq.quant.nn import QuantConv2d, QuantLinear

    s = ctx.s
    cls = QuantLinear if isinstance(mod, nn.Linear) else QuantConv2d
    work = copy.deepcopy(mod)
    q = cls.from_float(work, bits, levels=s["levels"], scale_dtype=s["scale_dtype"], init="alternating",
                       iters=s["init_iters"])  # fmt: skip
    q.weight.requires_grad_(True)
    q.scale.requires_grad_(True)
    if q.bias is not None:
        q.bias.requires_grad_(False)
    path = name[: -len(".weight")]
    parent_name, _, child = path.rpartition(".")
    parent = ctx.unet.get_submodule(parent_name) if parent_name else ctx.unet
    setattr(parent, child, q)
    try:
        opt = torch.optim.Adam([q.weight, q.scale], lr=s["finetune_lr"])
        x, t, e, target = ctx.train_set
        for _ in range(s["finetune_steps"]):
            idx = torch.randint(x.shape[0], (s["finetune_batch"],), generator=ctx.train_gen).to(x.device)
            with torch.enable_grad():
                out = _forward(ctx.unet, x, t, e, idx)
                loss = torch.nn.functional.mse_loss(out, target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        with torch.no_grad():
            return q.fake_weight().detach().clone()
    finally:
        setattr(parent, child, mod)


# ------------------------------------------------------------------------------ the analysis




# ------------------------------------------------------------------------------ local mode


def _rows(x: torch.Tensor, idx: torch.Tensor, conv: bool) -> torch.Tensor:
    """The recorded part of a layer's input or output: batch ``[uncond; cond]`` split into its two
    halves, then the same rows (Linear: token rows; Conv2d: whole samples) ``idx`` of both."""
    half = x.reshape(2, -1, *x.shape[1:]) if conv else x.reshape(2, -1, x.shape[-1])
    return half[:, idx]


def _pick(x: torch.Tensor, k: int, conv: bool, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """Row indices for :func:`_rows` (about ``k`` positions) and the share of all rows they are."""
    n = x.shape[0] // 2 if conv else x[..., 0].numel() // 2
    take = max(1, min(n, -(-k // (x.shape[-1] * x.shape[-2])))) if conv else min(n, k)
    return torch.randperm(n, generator=g)[:take], n / take


def record_layer_inputs(ctx: _Context, names: list[str], probes: int = 2) -> dict[str, dict]:
    """One forward of the float model on the proxy set (CFG pairs of trajectory states) recording a
    few hundred input rows (Linear) or feature maps (Conv2d) of each layer in ``names``, then
    ``probes`` backwards of random projections of the CFG-guided prediction and of the guidance
    direction, recording each projection's gradient at the same rows of each layer's output (how an
    error there reaches the model's output).

    Returns ``{name: {"x", "g_guided", "g_direction", "scale"}}`` (``g_*``: ``[probes, ...]``;
    ``scale``: all rows / recorded rows)."""
    s, rec = ctx.s, {}
    gen = torch.Generator().manual_seed(s["seed"] + 104729)

    def hooks(name, conv):
        def pre(module, args):
            x = args[0].detach()
            idx, scale = _pick(x, s["max_rows"], conv, gen)
            rec[name] = {"idx": idx, "x": _rows(x, idx, conv).to(torch.bfloat16), "scale": scale, "g": []}

        def post(module, args, out):
            if not out.requires_grad:  # fed by the timestep or the text alone: the gradient still starts here
                out = out.detach().requires_grad_(True)
            out.register_hook(lambda gy: rec[name]["g"].append(_rows(gy.detach(), rec[name]["idx"], conv).to(torch.bfloat16)))
            return out
        return pre, post

    handles = []
    for n in names:
        mod = _module(ctx.unet, n)
        pre, post = hooks(n, isinstance(mod, nn.Conv2d))
        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    x, t, e = ctx.proxy_inputs
    x = x.detach().clone().requires_grad_(True)  # the weights need no grad: the graph starts here
    try:
        with torch.enable_grad():
            eps = _forward(ctx.unet, x, t, e, slice(None))
            eu, ec = eps.chunk(2)
            w = s["guidance"]
            targets = {"guided": eu + w * (ec - eu), "direction": ec - eu}
            pg = torch.Generator().manual_seed(s["seed"] + 15485863)
            for which, out in targets.items():
                for p in range(probes):
                    r = torch.randn(out.shape, generator=pg).to(out)
                    torch.autograd.backward(out, r, retain_graph=which != "direction" or p < probes - 1)
                    for v in rec.values():  # each backward appended one gradient per layer
                        v.setdefault(which, []).append(v["g"].pop())
            del eps, eu, ec, targets, out
    finally:
        for h in handles:
            h.remove()
    result = {}
    for n, v in rec.items():
        result[n] = {"x": v["x"], "scale": v["scale"],
                     **{f"g_{k}": torch.stack(v.pop(k)) for k in ("guided", "direction")}}  # fmt: skip
    return result


def _layer_out(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        y = torch.nn.functional.conv2d(x.flatten(0, 1), w, None, mod.stride, mod.padding, mod.dilation, mod.groups)
        return y.reshape(2, -1, *y.shape[1:])
    return x @ w.t()


def local_metrics(mod: nn.Module, rec: dict, w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    """Layer-local errors of ``w_hat`` for ``w`` on the recorded inputs of ``rec``
    (:func:`record_layer_inputs`): ``mse`` the first-order squared error the layer's output error
    ``dy`` adds to the guided prediction, estimated from the random projections ``r`` as the mean
    of ``(g_r . dy)^2`` (``g_r`` the gradient of ``r . output`` at the layer's output; the recorded
    rows scaled to all rows), ``guidance_err`` the same for the guidance direction, ``layer_err`` the layer's own
    relative squared output error and ``snr_db`` its inverse in dB."""
    x = rec["x"].float()
    y, yq = _layer_out(mod, x, w.float()).double(), _layer_out(mod, x, w_hat.float()).double()
    dy = yq - y
    rel = float((dy**2).sum() / (y**2).sum().clamp_min(1e-300))

    def projected(g):  # E_r[(r . J dy)^2] = |J dy|^2: the output error, cross-row terms included
        dots = (g.double() * dy).flatten(1).sum(1) * rec["scale"]
        return float((dots**2).mean())

    return {"mse": projected(rec["g_guided"]), "guidance_err": projected(rec["g_direction"]),
            "layer_err": rel, "snr_db": _db(1.0, rel)}  # fmt: skip


def _weight_fake(unet, name: str, w: torch.Tensor, bits: int, levels: str, scale_dtype: str, iters: int) -> torch.Tensor:
    """:func:`_fake_weight` of layer ``name`` with the float weight ``w`` (a lazy UNet's is on meta)."""
    mod = _module(unet, name)
    original = mod._parameters["weight"]
    mod._parameters["weight"] = nn.Parameter(w, requires_grad=False)
    try:
        return _fake_weight(mod, bits, levels, scale_dtype, iters)
    finally:
        mod._parameters["weight"] = original
