"""Training data: load a corpus, tokenise it with supervision masks, optionally pack it, and stream sharded batches.

    ds = get_dataset("train.jsonl", tokenizer, seq_len=1024)          # columns: id, row, input_ids, labels
    train, held_out = split_eval(ds, 0.05, seed=0)
    stream = BatchStream(train, batch_size=8, rank=r, world_size=w, seed=0, pad_token_id=tokenizer.pad_token_id)
    batch = next(stream)    # a Batch: .inputs (input_ids, attention_mask | position_ids), .labels, .example_ids,
                            # .epoch, .position

Labels are stored *already shifted*: ``labels[t]`` is the target of position ``t`` (token ``t + 1``) or -100, so a
loss never shifts again and the last position of every document is -100.

Example ids. ``id`` is the data's own id as given (an ``id`` column of integers or of strings, unique, never null),
else the row number; ``row`` is the example's row number in the loaded data (int64, 0-based, after ``max_samples``).
Batches carry ``example_ids`` = ``row`` as an int64 tensor (strings cannot travel in tensors or collectives); where
ids are written for people (``examples.csv``), ``SourceIds`` maps rows back to the ``id`` as given. A conversation
split into one example per assistant turn (``chat.py``) gives several examples with the same ``id`` and ``row``.
"""

from ds_distill.data.batching import Batch, BatchStream, collate
from ds_distill.data.loading import FORMATS, SourceIds, check_rows, format_of, load_raw, with_ids
from ds_distill.data.tokenise import get_dataset, split_eval

__all__ = [
    "FORMATS",
    "Batch",
    "BatchStream",
    "SourceIds",
    "check_rows",
    "collate",
    "get_dataset",
    "format_of",
    "load_raw",
    "split_eval",
    "with_ids",
]
