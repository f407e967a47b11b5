"""tiny-sdxl: a small, genuinely trained Stable Diffusion XL-structured pipeline shipped with bfq.

tiny-sd's data and metric on SDXL's architecture (two text encoders, ``text_time`` added
conditioning, linear-projection transformers), so the SDXL paths of bfq can be tested and
measured without a download. See :mod:`bfq.tinysdxl.build` for the architecture and
:mod:`bfq.tinysdxl.train` for how the bundled weights were made; :mod:`bfq.tinysd.evaluate`
scores it like tiny-sd.

Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"


def pipeline_dir() -> Path:
    """The bundled tiny-sdxl ``StableDiffusionXLPipeline`` directory (``bfq/data/tiny-sdxl``)."""
    return _DATA / "tiny-sdxl"


def load_pipeline(torch_dtype=None, unet=None, directory=None):
    """Load the bundled tiny-sdxl as a diffusers ``StableDiffusionXLPipeline``, offline.

    Args:
        torch_dtype: dtype of the loaded weights (default ``torch.float32``).
        unet: an optional ``UNet2DConditionModel`` to use instead of the bundled one.
        directory: a pipeline directory to load instead of the bundled one.
    Returns:
        The pipeline, with the progress bar disabled.

    Example:
        >>> pipe = load_pipeline()
        >>> image = pipe("a handwritten digit seven", num_inference_steps=20).images[0]
    """
    from bfq.tinysd import load_bundled

    return load_bundled("StableDiffusionXLPipeline", directory or pipeline_dir(), torch_dtype, unet)


__all__ = ["pipeline_dir", "load_pipeline"]
