"""Running a .bfq model: `load` rebuilds a diffusers UNet from a file, `generate` samples images
with it inside its base pipeline."""
