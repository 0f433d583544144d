"""Which teacher layer each student layer came from: the provenance file ``student_init`` writes into the student's
folder (the only module that knows its name and keys), evenly spaced maps, and the ``--hidden_layers`` maps.

``distill_provenance.json``::

    {"teacher_layers": [0, 10, 19, 29],      # student layer i was made from teacher layer teacher_layers[i]
     "teacher_num_layers": 30,
     "teacher_fingerprint": "<sha256>",      # teachers.cache_format.teacher_fingerprint of the teacher folder
     "weights": "copied" | "random"}         # random: the shape only came from the teacher (a baseline)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ds_distill.common import UsageError, read_json, write_json_atomic

PROVENANCE = "distill_provenance.json"


def evenly_spaced(num_layers: int, teacher_layers: int) -> list[int]:
    """`num_layers` teacher layer indices spread evenly over [0, teacher_layers - 1], first and last included.

    Example: evenly_spaced(4, 30) -> [0, 10, 19, 29].
    """
    if not 1 <= num_layers <= teacher_layers:
        raise UsageError(f"--num_layers {num_layers} must be between 1 and the teacher's layer count {teacher_layers}")
    if num_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (num_layers - 1)) for i in range(num_layers)]


def write_provenance(
    folder: str | os.PathLike, layers: list[int], teacher_num_layers: int, fingerprint: str, random_init: bool
) -> Path:
    """Write ``folder/distill_provenance.json`` (atomically); return its path."""
    path = Path(folder) / PROVENANCE
    write_json_atomic(
        path,
        {
            "teacher_layers": list(layers),
            "teacher_num_layers": teacher_num_layers,
            "teacher_fingerprint": fingerprint,
            "weights": "random" if random_init else "copied",
        },
    )
    return path


def read_provenance(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The student folder's provenance, or None when it has none (a student not made by ``student_init``)."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return None
    return read_json(path, f"the student's {PROVENANCE}", "remake the student with python -m ds_distill.student_init")


def hidden_layer_map(spec: str, student_dir: str, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """``--hidden_layers`` -> (student layer, teacher layer) pairs, each layer's *output* matched.

    spec: ``auto`` (each student layer to the teacher layer it was copied from, from the student's provenance file),
    ``even`` (student layer i to ``evenly_spaced(n_student, n_teacher)[i]``) or explicit pairs ``s:t,...``.
    Errors: UsageError (one line) for no provenance, a provenance of another teacher depth, bad or out-of-range pairs.
    """
    if spec == "auto":
        prov = read_provenance(student_dir)
        if prov is None:
            raise UsageError(
                f"--hidden_layers auto: the student {student_dir} has no {PROVENANCE} (it was not made by "
                "ds_distill.student_init): pass --hidden_layers even or explicit pairs s:t,..."
            )
        if prov.get("weights") != "copied":
            raise UsageError(
                f"--hidden_layers auto: the student {student_dir} has random weights (student_init --random), no layer "
                "was copied: pass --hidden_layers even or explicit pairs s:t,..."
            )
        layers = list(prov["teacher_layers"])
        if len(layers) != n_student or prov.get("teacher_num_layers") != n_teacher:
            raise UsageError(
                f"--hidden_layers auto: {student_dir}/{PROVENANCE} maps {len(layers)} student layers onto a "
                f"{prov.get('teacher_num_layers')}-layer teacher, but the student has {n_student} and the teacher "
                f"{n_teacher}: pass the teacher it was made from, or explicit pairs s:t,..."
            )
        pairs = list(enumerate(layers))
    elif spec == "even":
        if n_student > n_teacher:
            raise UsageError(
                f"--hidden_layers even: the student has {n_student} layers, more than the teacher's {n_teacher}: "
                "pass explicit pairs s:t,..."
            )
        pairs = list(enumerate(evenly_spaced(n_student, n_teacher)))
    else:
        try:
            pairs = [(int(s), int(t)) for s, t in (item.split(":") for item in spec.split(",") if item.strip())]
        except ValueError:
            raise UsageError(
                f"--hidden_layers {spec!r} is not auto, even or pairs s:t,...: write e.g. 0:0,1:5"
            ) from None
        if not pairs:
            raise UsageError("--hidden_layers is empty: pass auto, even or pairs s:t,...")
    for s, t in pairs:
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise UsageError(
                f"--hidden_layers pair {s}:{t} is out of range: the student has layers 0..{n_student - 1}, "
                f"the teacher 0..{n_teacher - 1}"
            )
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise UsageError(
            f"--hidden_layers {spec!r} maps a student layer twice: give each student layer one teacher layer"
        )
    return pairs


def check_layerwise(pairs: list[tuple[int, int]], n_student: int, spec: str) -> None:
    """``--hidden_mode layerwise`` needs every student layer i paired, in order, with teacher layers t_i that increase
    (student layer i stands for the teacher block t_i .. t_(i+1) - 1). Errors: UsageError (one line) otherwise."""
    students, teachers = [s for s, _ in pairs], [t for _, t in pairs]
    if students != list(range(n_student)) or any(a >= b for a, b in zip(teachers, teachers[1:])):
        raise UsageError(
            f"--hidden_mode layerwise with --hidden_layers {spec!r} (pairs {pairs}): every student layer "
            f"0..{n_student - 1} "
            "must be paired, in order, with increasing teacher layers: use auto, even or such pairs"
        )


def copy_provenance(student_dir: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Copy the student's provenance into ``folder`` (a checkpoint's or export's Hugging Face files), if it has one:
    training keeps the layers where they came from, so a later run (``--rounds``) can still map them."""
    prov = read_provenance(student_dir)
    if prov is not None:
        write_json_atomic(Path(folder) / PROVENANCE, prov)
