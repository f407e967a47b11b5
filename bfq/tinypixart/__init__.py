"""tiny-pixart: a small, genuinely trained PixArt-Σ-structured pipeline shipped with bfq.

tiny-sd's data and metric on a diffusion transformer (``PixArtTransformer2DModel`` with
adaLN-single, patch size 2, a T5 text encoder), so the DiT paths of bfq can be tested and measured
without a download. See :mod:`bfq.tinypixart.build` for the architecture and
:mod:`bfq.tinypixart.train` for how the bundled weights were made; :mod:`bfq.tinysd.evaluate`
scores it like tiny-sd.

Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"


def pipeline_dir() -> Path:
    """The bundled tiny-pixart ``PixArtSigmaPipeline`` directory (``bfq/data/tiny-pixart``)."""
    return _DATA / "tiny-pixart"


def load_pipeline(torch_dtype=None, transformer=None, directory=None):
    """Load the bundled tiny-pixart as a diffusers ``PixArtSigmaPipeline``, offline.

    Args:
        torch_dtype: dtype of the loaded weights (default ``torch.float32``).
        transformer: an optional ``PixArtTransformer2DModel`` to use instead of the bundled one.
        directory: a pipeline directory to load instead of the bundled one.
    Returns:
        The pipeline, with the progress bar disabled.

    Example (PixArt's resolution binning knows only its 256-2048 pixel sizes, so turn it off):
        >>> pipe = load_pipeline()
        >>> image = pipe("a handwritten digit seven", num_inference_steps=20, use_resolution_binning=False).images[0]
    """
    from bfq.tinysd import load_bundled

    return load_bundled("PixArtSigmaPipeline", directory or pipeline_dir(), torch_dtype, transformer=transformer)


__all__ = ["pipeline_dir", "load_pipeline"]
