"""The adapters' gradients of a few optimizer steps of a LoRA student, for tests/test_lora_multirank.py.

``python -m tests.lora_grads OUT.pt CASES.json`` under the deepspeed launcher: for each case (RunConfig fields plus
``checkpointing``: "", "reentrant" or "non_reentrant") it builds the run as the entry point does, records every
adapter's full gradient (``deepspeed.utils.safe_get_full_grad``: a collective under ZeRO-3) between each backward and
optimizer step, trains, and rank 0 saves {case name: [{param name: grad}] per step} to OUT.pt. ``collect`` is the
same in process (the ZeRO-0 reference).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch


def collect(cfg_fields: dict[str, Any], checkpointing: str = "") -> list[dict[str, torch.Tensor]]:
    from deepspeed.utils import safe_get_full_grad

    from ds_distill.config import RunConfig
    from ds_distill.core.build import build

    trainer = build(RunConfig(**cfg_fields))
    if checkpointing:  # the model's own switch (ds-distill has no flag for it yet)
        trainer.student.module.lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    engine, steps = trainer.student, []
    step = engine.step

    def record_then_step(*args, **kwargs):
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
        steps.append({n: g.detach().float().cpu().clone() for n, g in grads.items()})
        return step(*args, **kwargs)

    engine.step = record_then_step
    trainer.fit()
    assert len(steps) == trainer.cfg.max_steps, len(steps)
    return steps


def main(out: str, cases: str) -> None:
    import torch.distributed as dist

    results = {}
    for name, case in json.loads(open(cases).read()).items():
        checkpointing = case.pop("checkpointing", "")
        results[name] = collect(case, checkpointing)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
