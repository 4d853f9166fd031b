"""genserve: Stable Diffusion generation and LoRA training, metered in buzz, with mandatory safety guards."""

__version__ = "0.1.0"
SERVICE_NAME = "genserve"
