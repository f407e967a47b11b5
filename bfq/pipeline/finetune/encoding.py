"""The pipeline components that turn images and captions into what the UNet trains on, and an
image-caption folder encoded once per dataset (:func:`encode_folder`).

Encoding a folder runs the VAE encoder and the text encoder over every example once, on the
training device, in fixed chunks of ``ENCODE_CHUNK`` examples (images of the next chunk load on a
background thread meanwhile), and keeps the VAE posterior's mean and standard deviation and the
text embedding of each example. With a cache directory they go to ``.npy`` files there (read back
memory-mapped, so a dataset larger than memory works): per example ``2 * C*h*w + S*D`` float32
values, e.g. 0.37 MB for SD-v1.5 at 512 px. The files are keyed by the examples (names, sizes,
modification times, captions), the resolution and the VAE and text encoder, and a progress record
is written after each chunk, so a killed encoding pass continues where it stopped and a second
run on the same data encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bfq._io import read_json_file, write_text_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ENCODE_CHUNK = 64
CACHE_VERSION = 1


def load_text_encoder(pipeline_dir: str | os.PathLike, device="cpu"):
    """``(tokenizer, text_encoder)`` of a diffusers Stable Diffusion pipeline directory (eval, frozen)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    base = Path(pipeline_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    encoder = CLIPTextModel.from_pretrained(str(base / "text_encoder"), local_files_only=True)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_vae(pipeline_dir: str | os.PathLike, device="cpu"):
    """The ``AutoencoderKL`` of a pipeline directory (eval, frozen, float32)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(pipeline_dir) / "vae"), local_files_only=True)
    return vae.float().to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """``[N, S, D]`` float32 CPU embeddings of ``prompts``, as Stable Diffusion computes them
    (padded to the tokenizer's ``model_max_length``, last hidden state)."""
    device = next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(
            list(prompts[i : i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE posterior of ``images`` (``[N, 3, H, W]`` in [-1, 1]), both times
    the VAE's ``scaling_factor``, float32 on the CPU."""
    device = next(vae.parameters()).device
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i : i + batch_size].to(device, torch.float32)).latent_dist
        means.append(post.mean.cpu() * scale)
        stds.append(post.std.cpu() * scale)
    return torch.cat(means), torch.cat(stds)


def image_resolution(pipeline_dir: str | os.PathLike) -> int:
    """The pixel size the pipeline's model (UNet or transformer) was trained at:
    ``sample_size * 2^(VAE levels - 1)``."""
    from bfq.families import pipeline_family

    base = Path(pipeline_dir)
    unet_cfg = pipeline_family(base)[1]
    vae_cfg = json.loads((base / "vae" / "config.json").read_text())
    return int(unet_cfg["sample_size"]) * 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def folder_pairs(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(image path, caption)`` for every image in ``folder`` that has a ``.txt`` caption next to
    it (same stem), sorted by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such data folder: {folder}")
    pairs = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.with_suffix(".txt").is_file():
            pairs.append((path, path.with_suffix(".txt").read_text(encoding="utf-8").strip()))
    if not pairs:
        raise FileNotFoundError(f"{folder}: no image files with a .txt caption next to them")
    return pairs


def load_image(path: Path, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [-1, 1]: RGB, resized (shorter side) and center-cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------ encoded folders


@dataclass
class EncodedFolder:
    """Every example of a folder encoded: ``mean``/``std`` ``[N, C, h, w]`` (VAE posterior times the
    scaling factor), ``ehs`` ``[N, S, D]`` text embeddings (numpy arrays, memory-mapped when cached),
    ``uncond`` ``[S, D]`` the empty prompt's embedding; ``path`` the cache directory or None."""

    mean: np.ndarray
    std: np.ndarray
    ehs: np.ndarray
    uncond: torch.Tensor
    path: Path | None = None


def _component_id(base: Path, component: str) -> list:
    """What identifies a pipeline component: its files' names, sizes and modification times."""
    folder = base / component
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def cache_key(pairs, pipeline_dir, size: int) -> str:
    """Hash of the examples (name, size, modification time, caption), the resolution and the VAE,
    tokenizer and text encoder of ``pipeline_dir``."""
    base = Path(pipeline_dir)
    examples = [(p.name, p.stat().st_size, p.stat().st_mtime_ns, caption) for p, caption in pairs]
    parts = {"version": CACHE_VERSION, "examples": examples, "size": int(size),
             "components": {c: _component_id(base, c) for c in ("vae", "tokenizer", "text_encoder")}}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class _Store:
    """The arrays being filled (in memory, or ``.npy`` files in ``path``) and how far they are."""

    FIELDS = ("mean", "std", "ehs")

    def __init__(self, path: Path | None, key: str, n: int, shapes: dict[str, tuple]):
        self.path, self.key, self.n, self.done = path, key, n, 0
        if path is None:
            self.arrays = {f: np.empty((n, *shapes[f]), np.float32) for f in self.FIELDS}
            return
        record = path / "progress.json"
        progress = read_json_file(record, ValueError, "encoding progress") if record.is_file() else {}
        if progress.get("key") == key and progress.get("n") == n:
            self.done = int(progress["done"])
            self.arrays = {f: np.load(path / f"{f}.npy", mmap_mode="r+") for f in self.FIELDS}
            return
        path.mkdir(parents=True, exist_ok=True)
        self.arrays = {f: np.lib.format.open_memmap(path / f"{f}.npy", "w+", np.float32, (n, *shapes[f]))
                       for f in self.FIELDS}  # fmt: skip
        self.mark(0)

    def write(self, start: int, values: dict[str, torch.Tensor]) -> None:
        for f in self.FIELDS:
            self.arrays[f][start : start + len(values[f])] = values[f].numpy()
        end = start + len(values["mean"])
        if self.path is not None:
            for a in self.arrays.values():
                a.flush()
        self.mark(end)

    def mark(self, done: int) -> None:
        self.done = done
        if self.path is not None:
            record = {"key": self.key, "n": self.n, "done": done}
            write_text_atomic(self.path / "progress.json", json.dumps(record) + "\n")

    def read_only(self) -> dict[str, np.ndarray]:
        if self.path is None:
            return self.arrays
        return {f: np.load(self.path / f"{f}.npy", mmap_mode="r") for f in self.FIELDS}


def encode_folder(pairs, pipeline_dir, *, size: int, device="cpu", cache_dir=None, chunk: int = ENCODE_CHUNK,
                  log: Callable[[str], None] | None = None) -> EncodedFolder:  # fmt: skip
    """Encode every ``(image path, caption)`` of ``pairs`` once with the pipeline's VAE and text
    encoder on ``device``. With ``cache_dir`` the result lives in ``cache_dir/<key>/`` (see the
    module docstring): a finished cache is reused as is, an unfinished one is continued."""
    key = cache_key(pairs, pipeline_dir, size)
    path = Path(cache_dir) / key if cache_dir is not None else None
    tokenizer, text_encoder = load_text_encoder(pipeline_dir, device)
    uncond = encode_text(tokenizer, text_encoder, [""])[0]
    vae_cfg = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latent = (int(vae_cfg.get("latent_channels", 4)), size // down, size // down)
    store = _Store(path, key, len(pairs), {"mean": latent, "std": latent, "ehs": tuple(uncond.shape)})
    if store.done < len(pairs):
        if log and store.done:
            log(f"continuing the encoding of {len(pairs)} examples at {store.done} ({path})")
        _encode_chunks(pairs, store, load_vae(pipeline_dir, device), tokenizer, text_encoder, size, chunk)
    arrays = store.read_only()
    return EncodedFolder(arrays["mean"], arrays["std"], arrays["ehs"], uncond, path)


def _encode_chunks(pairs, store: _Store, vae, tokenizer, text_encoder, size: int, chunk: int) -> None:
    """Fill ``store`` from ``store.done`` on, chunk by chunk; the next chunk's images load meanwhile."""
    starts = list(range(store.done - store.done % chunk, len(pairs), chunk))

    def images(start: int) -> torch.Tensor:
        return torch.stack([load_image(p, size) for p, _ in pairs[start : start + chunk]])

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(images, starts[0]) if starts else None
        for j, start in enumerate(starts):
            batch = pending.result()
            pending = pool.submit(images, starts[j + 1]) if j + 1 < len(starts) else None
            mean, std = encode_images(vae, batch, batch_size=chunk)
            ehs = encode_text(tokenizer, text_encoder, [c for _, c in pairs[start : start + chunk]], batch_size=chunk)
            store.write(start, {"mean": mean, "std": std, "ehs": ehs})
