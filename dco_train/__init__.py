"""The DCO training engine for SDXL: data, TI tokens, LoRA, DCO loss, training loop, files,
reward-guidance sampling and the command line. It never imports ComfyUI."""

__version__ = "0.1.0"
