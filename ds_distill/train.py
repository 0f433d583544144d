"""Distil one or more frozen teachers into a student:
``deepspeed --module ds_distill.train --teacher T --student S ...``

The student trains in a DeepSpeed engine configured by its JSON (ZeRO stage, precision, optimizer, clipping,
accumulation); each teacher is a second engine with no optimizer (``ds_distill.core``: the loop and its wiring).
"""

from __future__ import annotations

import sys

from ds_distill.config import parse_args
from ds_distill.core.build import build, default_callbacks, run  # noqa: F401  (the library's entry, as tests call it)
from ds_distill.runtime import distributed


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        cfg = parse_args(argv)
        if cfg.rounds > 1:
            from ds_distill.extras import rounds

            trainers = rounds.run_rounds(cfg, default_callbacks)
            return trainers[-1].exit_code if trainers else 0
        return run(cfg, default_callbacks(cfg)).exit_code

    return distributed.entry_point(body)


if __name__ == "__main__":
    sys.exit(main())
