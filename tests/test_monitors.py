"""DeepSpeed's monitors as users turn them on: the scalars read back with each tool's own reader, and a missing
package."""

import glob
import json
import struct
import time
from pathlib import Path

import pytest

from ds_distill import models, plot, train
from ds_distill.runtime import monitors
from tests.helpers import base_args, ds_json, make_cfg, run_main


def read_wandb_history(run_file: str) -> list[dict | None]:
    """The history rows of an offline wandb run file (run-*.wandb), decoded with wandb's own protobuf Record; None
    marks the run's exit record (wandb's service process may still be writing after ``wandb.finish()`` returns).

    wandb 0.19+ ships no Python reader; the file is a LevelDB-style log (wandb/core's store): a 7-byte header
    (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records [crc32 u32][length u16][type u8][payload], a
    payload split over blocks as FIRST(2)/MIDDLE(3)/LAST(4) pieces, FULL(1) when whole; block tails < 7 bytes are
    padding.
    """
    from wandb.proto import wandb_internal_pb2

    raw = Path(run_file).read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1, raw[:8]
    block, pos, piece, rows = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block end
            pos += left - 7
            continue
        piece += raw[pos : pos + n]
        pos += n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.WhichOneof("record_type") == "exit":
                rows.append(None)  # the run's end: everything before it is on disk
            elif record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_tensorboard_and_wandb_log_the_csv_scalars(tiny, dist_env, tmp_path, monkeypatch):
    import wandb  # both are test requirements (requirements.lock): never skipped
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run folder is written locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", "unset below")  # so that the trainer's setting is undone after the test
    monkeypatch.delenv("WANDB_DIR")
    d = json.loads(Path(ds_json(tmp_path)).read_text())
    d["tensorboard"] = {"enabled": True, "output_path": "", "job_name": "tb"}
    d["wandb"] = {"enabled": True, "project": "ds-distill-test"}
    (tmp_path / "all.json").write_text(json.dumps(d))
    out = tmp_path / "run"
    trainer = train.run(
        make_cfg(tiny, out, max_steps=2, eval_steps=2, eval_fraction=0.25, deepspeed_config=str(tmp_path / "all.json"))
    )
    wandb.finish()  # flush the offline run file (at exit otherwise)

    logged = {k for h in trainer.history for k in h if k != "step"}
    assert {
        "Train/loss",
        "Train/ce",
        "Train/kd",
        "Train/lr",
        "Train/grad_norm",
        "Train/tokens_per_s",
        "Eval/loss",
        "Eval/ppl",
    } <= logged
    csv_curves = {k: v for k, v in plot.read_curves(out).items() if k in logged}
    assert set(csv_curves) == logged and all(len(v) >= 1 for v in csv_curves.values())

    acc = EventAccumulator(str(out / "monitor" / "tb"))
    acc.Reload()
    tb = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag in logged}
    assert set(tb) == logged
    for tag, points in csv_curves.items():  # tensorboard stores float32
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-7), tag

    [run_file] = glob.glob(str(out / "monitor" / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(120):
        rows = read_wandb_history(run_file)
        if None in rows:
            break
        time.sleep(0.5)
    assert rows[-1] is None, "the offline run file ends with its exit record"
    wb: dict[str, list] = {}
    for row in rows[:-1]:
        for key, value in row.items():
            if key in logged:
                wb.setdefault(key, []).append((row["step"], value))
    assert set(wb) == logged
    for tag, points in csv_curves.items():
        assert [s for s, _ in wb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in wb[tag]] == pytest.approx([v for _, v in points], rel=1e-12), tag


@pytest.mark.parametrize("block, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_monitor_package_is_one_line_before_any_model(
    tiny, tmp_path, capsys, keep_process_group, monkeypatch, block, package
):
    real = monitors.module_available
    monkeypatch.setattr(monitors, "module_available", lambda name: name != package and real(name))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the monitor check")

    monkeypatch.setattr(models.loading, "load_model", no_model)
    d = json.loads(Path(ds_json(tmp_path)).read_text())
    d[block] = {"enabled": True}
    (tmp_path / "m.json").write_text(json.dumps(d))
    code, errors = run_main(base_args(tiny, tmp_path / "o") + ["--deepspeed_config", str(tmp_path / "m.json")], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert (
        f'enables the "{block}" monitor but the {package!r} package is not installed: pip install '
        f"'ds-distill[{block}]'" in errors[0]
    )
    assert not (tmp_path / "o").exists(), "stopped before the run directory was written"
