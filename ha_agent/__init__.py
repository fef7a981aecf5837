"""sglang-ha: a high-availability appliance for SGLang inference."""

__version__ = "0.1.0"
