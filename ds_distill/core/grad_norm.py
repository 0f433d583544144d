"""The gradient norm of each optimizer step (the logged ``grad_norm``), whatever the ZeRO stage.

DeepSpeed keeps the norm it clips by (``engine.get_global_grad_norm()``) when an optimizer wrapper of its own runs the
step: ZeRO stages 1-3, bf16 and fp16. Under stage 0 in fp32 the engine hands the step to the plain torch optimizer and
clips with ``deepspeed.runtime.utils.clip_grad_norm_`` (``engine.clip_fp32_gradients``), whose norm it drops, so
``get_global_grad_norm()`` stays None. There ``GradNorm`` computes the same norm once per optimizer step, after the
boundary micro-batch's backward (which has averaged the gradients over the ranks) and before ``engine.step()`` clips
them. DeepSpeed still owns the clipping: nothing here changes a gradient.
"""

from __future__ import annotations

import torch

from ds_distill import models


class GradNorm:
    """``latest()``: the 2-norm of the whole model's gradient at the last optimizer step, before clipping: a float or
    0-d tensor (a device tensor with stage 0, read on the host only when logged), None before the first step.

    ``before_step()`` is called before every ``engine.step()``; it acts only where DeepSpeed keeps no norm (``own``)
    and only at a gradient accumulation boundary, where the gradients are complete.
    Formula: ``sqrt(sum_p ||g_p||^2)`` over the parameters with a gradient (``torch.nn.utils.get_total_norm``), what
    DeepSpeed's stage 1-3 optimizers report (tests/test_parity.py::test_stage0_clips_as_zero1_logs_its_norm_and_exports
    checks it against ZeRO-1 on the same batches).
    """

    def __init__(self, engine):
        self.engine = engine
        self.own = models.plain_optimizer(engine)  # DeepSpeed clips with clip_fp32_gradients and keeps no norm
        self._norm: torch.Tensor | None = None

    @torch.no_grad()
    def before_step(self) -> None:
        if not self.own or not self.engine.is_gradient_accumulation_boundary():
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        self._norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else None

    def latest(self):
        return self._norm if self.own else self.engine.get_global_grad_norm()
