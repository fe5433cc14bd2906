"""tunelens: a reproducible LLM fine-tuning study workflow."""
__version__ = "0.1.0"
