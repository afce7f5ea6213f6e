"""Files: the zarr store (binding layout), readers of images and slides, export formats, and
safetensors checkpoints."""
