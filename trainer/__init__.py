"""zit-trainer's engine: Z-Image-Turbo LoRA tools and training. Knows nothing of ComfyUI."""
__version__ = "0.1.0"
