"""The generation engine: samplers, the LoRA adapter cache, safety-injected generation and PNG infotext.

Importing this package is cheap (no torch); the modules that need diffusers import it themselves.
"""
