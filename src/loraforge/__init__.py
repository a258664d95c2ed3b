"""LoRA Forge: multi-concept LoRA training and posed scene generation for SD 1.5, on SLURM."""

__version__ = "0.1.0"
