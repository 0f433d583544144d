"""ds-distill: distil a large language model into a smaller one with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
