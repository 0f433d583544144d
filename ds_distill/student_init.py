"""Make a student from a teacher by keeping a subset of its decoder layers (DistilBERT-style initialisation).

The student has the teacher's tokenizer and config except `num_hidden_layers`. Its embeddings, final norm and
lm_head are the teacher's (tied stays tied), and student layer i is a copy of teacher layer `layers[i]`.
With `--random` the student has the same shape but freshly initialised weights (the baseline to beat).

    python -m ds_distill.student_init --teacher runs/teacher --out runs/student --layers 0,10,20,29
    python -m ds_distill.student_init --teacher runs/teacher --out runs/student --num_layers 6 [--random]

Works for any Llama-like `AutoModelForCausalLM`: the decoder layers must be `model.model.layers`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

from ds_distill.common import UsageError, print_error
from ds_distill.models.layer_map import evenly_spaced, write_provenance
from ds_distill.models.tokenizers import copy_generation_config
from ds_distill.teachers.cache_format import teacher_fingerprint

__all__ = ["check_layers", "evenly_spaced", "make_student", "main"]


def check_layers(layers: list[int], teacher_layers: int) -> None:
    """Raise UsageError naming the first index outside [0, teacher_layers) or repeated."""
    if not layers:
        raise UsageError("--layers is empty: give teacher layer indices like 0,4,8")
    for i in layers:
        if not 0 <= i < teacher_layers:
            raise UsageError(
                f"--layers index {i} is out of range: the teacher has {teacher_layers} layers (0..{teacher_layers - 1})"
            )
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise UsageError(f"--layers repeats index {dup[0]}: list each teacher layer at most once")


def _decoder_layers(model: torch.nn.Module, where: str) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UsageError(
            f"{where} is a {type(model).__name__} without model.model.layers: student_init only handles Llama-like "
            "decoders"
        )
    return layers


def make_student(
    teacher_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layers: list[int] | None = None,
    num_layers: int | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> list[int]:
    """Write a student (config.json, model.safetensors, tokenizer, distill_provenance.json) to `out_dir`; return the
    teacher layers kept.

    ``distill_provenance.json`` (``models.layer_map``) records the kept layers in student order, the teacher's depth
    and fingerprint, and whether the weights were copied: ``--hidden_layers auto`` maps each student layer onto them.

    Give exactly one of `layers` (teacher indices, in student order) or `num_layers` (evenly spaced, first and
    last included). With `random_init` the weights come from the model's own initialiser seeded by `seed` and the
    returned list only records the shape's origin. The student is saved in the teacher's dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (layers is None) == (num_layers is None):
        raise UsageError("give exactly one of --layers (e.g. 0,4,8) or --num_layers N")
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if not (teacher_dir / "config.json").is_file():
        raise UsageError(f"--teacher {teacher_dir} has no config.json: point it at a Hugging Face model directory")
    config = AutoConfig.from_pretrained(teacher_dir)
    n_teacher = getattr(config, "num_hidden_layers", None)
    if n_teacher is None:
        raise UsageError(
            f"{teacher_dir}/config.json has no num_hidden_layers: student_init only handles Llama-like decoders"
        )
    layers = list(layers) if layers is not None else evenly_spaced(num_layers, n_teacher)
    check_layers(layers, n_teacher)

    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(layers)
    # Per-layer lists (e.g. sliding vs full attention in newer configs) must follow the kept layers.
    if isinstance(getattr(config, "layer_types", None), list):
        student_config.layer_types = [config.layer_types[i] for i in layers]

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(student_config, dtype=config.dtype)
    _decoder_layers(student, "the student")
    if not random_init:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=config.dtype)
        _decoder_layers(teacher, f"--teacher {teacher_dir}")
        prefix = "model.layers."
        state = {}
        for name, tensor in teacher.state_dict().items():
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                if int(index) in layers:
                    state[f"{prefix}{layers.index(int(index))}.{rest}"] = tensor
            else:
                state[name] = tensor  # embeddings, final norm, lm_head (the same tensor as the embedding when tied)
        # strict: any name the student has and the teacher lacks means the two are not the same architecture.
        try:
            student.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise UsageError(
                f"teacher {teacher_dir} weights do not fit the student ({first}): is it a Llama-like model?"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir, safe_serialization=True)
    copy_generation_config(teacher_dir, out_dir)  # save_pretrained rebuilt it from config.json: the teacher's eos ids
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)
    write_provenance(out_dir, layers, n_teacher, teacher_fingerprint(str(teacher_dir)), random_init)
    return layers


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r} is not a comma-separated list of integers: write e.g. 0,4,8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--teacher", required=True, type=Path, help="Hugging Face directory of the teacher")
    parser.add_argument("--out", required=True, type=Path, help="directory for the student")
    pick = parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--layers", help="teacher layers to keep, in student order, e.g. 0,4,8,12")
    pick.add_argument("--num_layers", type=int, help="keep N evenly spaced teacher layers, first and last included")
    parser.add_argument("--random", action="store_true", help="random weights of the same shape (a baseline)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random initialisation")
    args = parser.parse_args(argv)
    try:
        layers = make_student(
            args.teacher,
            args.out,
            layers=_parse_layers(args.layers) if args.layers is not None else None,
            num_layers=args.num_layers,
            random_init=args.random,
            seed=args.seed,
        )
    except UsageError as e:
        print_error(e)
        raise SystemExit(2)
    kind = "random init, shape of" if args.random else "copied"
    print(f"student_init: {args.out}: {len(layers)} layers ({kind} teacher layers {layers})")


if __name__ == "__main__":
    main(sys.argv[1:])
