"""UMBRELLA: vision-language models on brain MRI."""

__version__ = "0.1.0"
