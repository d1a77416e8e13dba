"""yochameleon: personalize unified multimodal models with learned concept tokens."""

__version__ = "0.1.0"
