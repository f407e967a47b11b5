"""tiny-sd: a small, genuinely trained Stable Diffusion v1.5-structured pipeline shipped with bfq.

It is the default model of ``bfq quantize tiny-sd`` and ``bfq eval tiny-sd``: no download needed.
See :mod:`bfq.tinysd.build` for the architecture, :mod:`bfq.tinysd.train` for how the bundled
weights were made, and :mod:`bfq.tinysd.evaluate` for the quality metric.

Importing this package does not import torch.
"""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent.parent / "data"


def pipeline_dir() -> Path:
    """The bundled tiny-sd ``StableDiffusionPipeline`` directory (``bfq/data/tiny-sd``)."""
    return _DATA / "tiny-sd"


def classifier_dir() -> Path:
    """The bundled digit classifier directory (``bfq/data/digit-classifier``)."""
    return _DATA / "digit-classifier"


def load_pipeline(torch_dtype=None, unet=None, directory=None):
    """Load the bundled tiny-sd as a diffusers ``StableDiffusionPipeline``, offline.

    Args:
        torch_dtype: dtype of the loaded weights (default ``torch.float32``).
        unet: an optional ``UNet2DConditionModel`` to use instead of the bundled one (for example a
            quantized UNet from ``bfq.load_unet``).
        directory: a pipeline directory to load instead of the bundled one.
    Returns:
        The pipeline, with the progress bar disabled.

    Example:
        >>> pipe = load_pipeline()
        >>> image = pipe("a handwritten digit seven", num_inference_steps=20).images[0]
    """
    return load_bundled("StableDiffusionPipeline", directory or pipeline_dir(), torch_dtype, unet)


def load_bundled(pipeline_class: str, directory, torch_dtype=None, unet=None, transformer=None):
    """A bundled tiny pipeline folder as the diffusers ``pipeline_class``, offline, in ``torch_dtype``
    (the weights are stored in fp32), optionally with another ``unet`` (or, for a diffusion
    transformer pipeline, ``transformer``), progress bar off."""
    import torch

    from bfq._quiet import quiet_libraries

    kwargs = {name: m for name, m in (("unet", unet), ("transformer", transformer)) if m is not None}
    with quiet_libraries():
        import diffusers

        pipe = getattr(diffusers, pipeline_class).from_pretrained(str(directory), local_files_only=True, **kwargs)
    if torch_dtype is not None and torch_dtype != torch.float32:
        pipe.to(dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["pipeline_dir", "classifier_dir", "load_pipeline"]
