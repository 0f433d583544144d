"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes the completions, the teacher grades them.
``stream``: the stream that swaps sampled completions into a seeded fraction of the micro-batches; ``generation``: the
``Generator`` seam and transformers' ``generate`` over the student engine (direct, whole copy, layered ZeRO-3);
``monitors``: the generation rate and the collapse monitors of the samples, with their warning thresholds;
``anchor``: the CE on the dataset's own completions of the sampled prompts (``--on_policy_anchor``)."""

from ds_distill.on_policy import anchor
from ds_distill.on_policy.generation import Generator, HFGenerator, Sampling, make_generator, mix_seed
from ds_distill.on_policy.monitors import CollapseWatch, GenerationMonitor, monitor, sample_counts, window_metrics
from ds_distill.on_policy.stream import OnPolicyStream, check_prompts, prompt_length, wrap

__all__ = [
    "CollapseWatch",
    "GenerationMonitor",
    "Generator",
    "HFGenerator",
    "OnPolicyStream",
    "Sampling",
    "anchor",
    "check_prompts",
    "make_generator",
    "mix_seed",
    "monitor",
    "prompt_length",
    "sample_counts",
    "window_metrics",
    "wrap",
]
