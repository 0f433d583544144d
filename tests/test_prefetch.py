"""Batches prepared off the training thread: the same batches, and the data position of the last consumed batch."""

import time

import pytest
import torch

from ds_distill import data, train
from ds_distill.data.prefetch import Prefetcher
from tests.helpers import as_lists, ds_json, losses_of, make_cfg


def _stream(n=20, batch_size=3):
    rows = [{"input_ids": list(range(i, i + 2 + i % 5)), "labels": list(range(i, i + 2 + i % 5))} for i in range(n)]
    import datasets

    ds = datasets.Dataset.from_list(
        [{**r, "id": i, "row": i} for i, r in enumerate(rows)]
    )  # the columns data.get_dataset gives
    return data.BatchStream(ds, batch_size=batch_size, rank=0, world_size=1, seed=3, pad_token_id=0)


def test_prefetcher_yields_the_same_batches_and_the_consumed_position():
    ref, pre = _stream(), Prefetcher(_stream(), depth=3, pin=False)
    for k in range(9):  # crosses two epochs (6 batches per epoch)
        a, b = next(ref), next(pre)
        assert as_lists(a) == as_lists(b)  # the batch's epoch and position too: what tracking reads
        time.sleep(0.02)  # let the thread run ahead: its stream is then up to 3 batches past the trainer
        assert pre.state_dict() == ref.state_dict(), k
        assert (b.epoch, b.position) == (ref.epoch, ref.consumed - 3)
    # resume from the consumed position: the next batches continue the reference exactly
    again = Prefetcher(_stream(), depth=2, pin=False)
    again.load_state_dict(pre.state_dict())
    pre.load_state_dict(ref.state_dict())  # also reloading a running prefetcher drops what it drew ahead
    for _ in range(4):
        a, b, c = next(ref), next(again), next(pre)
        assert as_lists(a) == as_lists(b) == as_lists(c)
    pre.close(), again.close()


def test_prefetcher_raises_the_streams_error_in_the_trainers_thread():
    class Broken:
        def state_dict(self):
            return {}

        def __next__(self):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        next(Prefetcher(Broken(), depth=2, pin=False))


def test_resume_with_prefetching_continues_the_same_curve(tiny, dist_env, tmp_path):
    """Prefetching on (3 ahead, then 2 after the resume): straight run == saved at 3 and resumed."""
    cfg_ds = ds_json(tmp_path)
    straight = train.run(make_cfg(tiny, tmp_path / "s", max_steps=6, prefetch_batches=3, deepspeed_config=cfg_ds))
    first = train.run(
        make_cfg(tiny, tmp_path / "r", max_steps=3, save_steps=3, prefetch_batches=3, deepspeed_config=cfg_ds)
    )
    second = train.run(
        make_cfg(tiny, tmp_path / "r", max_steps=6, resume=True, prefetch_batches=2, deepspeed_config=cfg_ds)
    )
    assert second.history[0]["step"] == 4
    assert losses_of(first) + losses_of(second) == pytest.approx(losses_of(straight), rel=1e-5, abs=1e-6)


def test_a_run_that_fails_stops_its_prefetch_thread(tiny, dist_env, tmp_path, monkeypatch):
    """An error at a checkpoint ends the run; the prefetch thread stops with it (``Callback.on_exit``), not at exit."""
    import threading

    from deepspeed.runtime.engine import DeepSpeedEngine

    def failing_save(self, *a, **kw):
        raise RuntimeError("the checkpoint failed")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", failing_save)
    cfg = make_cfg(
        tiny, tmp_path / "f", max_steps=2, save_steps=1, prefetch_batches=3, deepspeed_config=ds_json(tmp_path)
    )
    with pytest.raises(RuntimeError, match="the checkpoint failed"):
        train.run(cfg)
    assert not [t for t in threading.enumerate() if t.name == "ds_distill-prefetch"], "prefetch thread left running"


def test_pin_copies_every_tensor_into_pinned_memory(monkeypatch):
    """pin=True: each tensor of the micro-batch goes through Tensor.pin_memory (a CUDA call, faked on this CPU
    build)."""
    pinned = []

    def fake_pin(t):
        pinned.append(t.clone())
        return pinned[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    pre = Prefetcher(_stream(), depth=1, pin=True)
    batch = next(pre)
    pre.close()  # the thread has drawn (and pinned) more batches ahead
    n = len(pinned)
    tensors = [*batch.inputs.values(), batch.labels, batch.example_ids]
    assert n >= len(tensors) and all(any(b is p for p in pinned) for b in tensors)
    pre = Prefetcher(_stream(), depth=1, pin=False)
    next(pre)
    pre.close()
    assert len(pinned) == n, "pin=False pins nothing"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_on_a_gpu():
    batch = next(Prefetcher(_stream(), depth=1, pin=True))
    assert all(t.is_pinned() for t in [*batch.inputs.values(), batch.labels, batch.example_ids])
