"""Load the student and the teacher(s) as DeepSpeed engines, each under its own ZeRO config, and check vocabularies.

Both models are wrapped in ``HiddenStatesLM``: the same child modules under the same names (so checkpoints and
exports keep the Hugging Face parameter names), but ``forward`` returns the final hidden states ``[B, T, H]``. The
loss then calls ``head`` (an ``OutputHead``: the lm_head module plus whatever the model's own forward applies after it),
chunk by chunk, so full ``[tokens, vocab]`` logits never exist (ZeRO-3's module hooks gather the partitioned lm_head
weight on each call). ``check_logits`` proves at start-up that this gives the model's own logits.
"""

from ds_distill.models.head import (
    HiddenStatesLM,
    LogitTransform,
    check_logits,
    check_output_rows,
    sparse_tied_embedding,
)
from ds_distill.models.loading import (
    REPLICATE_FRACTION,
    LoadedModel,
    attn_implementation,
    check_positions,
    load_model,
    model_config,
    moe_leaf_modules,
    parameter_count,
    plain_optimizer,
    student_engine,
    student_placement,
    teacher_engine,
    teacher_placement,
)
from ds_distill.models.lora import LoraSpec
from ds_distill.models.tokenizers import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    copy_generation_config,
    copy_tokenizer,
    load_tokenizer,
    shared_vocab_size,
    vocab_map,
)

__all__ = [
    "GENERATION_CONFIG",
    "copy_generation_config",
    "REPLICATE_FRACTION",
    "TOKENIZER_FILES",
    "HiddenStatesLM",
    "LoadedModel",
    "LogitTransform",
    "LoraSpec",
    "attn_implementation",
    "check_logits",
    "sparse_tied_embedding",
    "check_output_rows",
    "check_positions",
    "copy_tokenizer",
    "load_model",
    "load_tokenizer",
    "model_config",
    "moe_leaf_modules",
    "parameter_count",
    "shared_vocab_size",
    "vocab_map",
    "student_engine",
    "teacher_engine",
    "plain_optimizer",
    "student_placement",
    "teacher_placement",
]
