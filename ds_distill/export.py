"""Turn a training checkpoint into a Hugging Face model folder: ``python -m ds_distill.export CHECKPOINT OUT_DIR``.

CHECKPOINT is ``output_dir/checkpoints`` (the tag named by ``latest``) or one tag folder inside it. The weights are
DeepSpeed's fp32 master weights, consolidated from every rank's ZeRO shards (no GPU and no process group needed),
saved as safetensors in the dtype the student trained in, next to its config and tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_distill.common import UsageError, is_complete, run_cli
from ds_distill.core.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ds_distill.export", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("checkpoint", help="output_dir/checkpoints, or a step_* folder in it")
    parser.add_argument(
        "out_dir", help="folder for the Hugging Face model (created, or replaced if it holds an earlier export)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out_dir)

    def body() -> None:
        # The export replaces out_dir whole once complete: never a folder that holds something else.
        if out.is_dir() and any(out.iterdir()) and not is_complete(out):
            raise UsageError(f"{out} exists and is not an earlier export: pass a new or empty folder")
        print(export_checkpoint(args.checkpoint, args.out_dir))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
