"""Shared test setup: CPU DeepSpeed, a project-local JIT cache, and tiny models built once per session."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Before deepspeed is imported anywhere: CPU accelerator (gloo), and the shm op JIT-built once into the project cache.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def keep_process_group(monkeypatch):
    """The entry points (train, cache_teacher, generate) tear the process group down at exit; DeepSpeed caches its
    groups, so in-process tests keep the session's group alive (launcher tests run in their own processes)."""
    from ds_distill.runtime import distributed

    monkeypatch.setattr(distributed, "destroy", lambda: None)


@pytest.fixture(autouse=True)
def no_leftover_zero3_config():
    """transformers keeps the last HfDeepSpeedConfig as a global: a ZeRO-3 one left by an earlier test's engine would
    make a later test's plain from_pretrained build empty (partitioned) weights. Every engine sets its own again."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    yield


@pytest.fixture(scope="session")
def dist_env():
    """One-rank process group for in-process engine tests (the same call the entry point makes)."""
    from ds_distill.runtime import distributed

    world = distributed.init_distributed()
    yield world


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny tokenizer, a 2-layer teacher, a 1-layer student (same tokenizer) and a small text corpus."""
    import json
    import random

    from tests import tiny as tiny_mod
    from tests.helpers import WORDS

    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_mod.make_tokenizer(root / "tok")
    teacher = tiny_mod.make_model(root / "teacher", tok, layers=2, hidden=32, heads=4, seed=1)
    student = tiny_mod.make_model(root / "student", tok, layers=1, hidden=32, heads=4, seed=2)
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as fh:
        for i in range(64):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30)))}) + "\n")
    return {
        "root": root,
        "tokenizer": tok,
        "teacher": str(teacher),
        "student": str(student),
        "data": str(root / "train.jsonl"),
    }


@pytest.fixture(scope="session")
def pc_data(tiny):
    """Prompt/completion records for on-policy runs (``helpers.write_pc_data``: prompts of 2 to 12 words)."""
    from tests.helpers import write_pc_data

    return write_pc_data(tiny["root"] / "pc.jsonl")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures: tests/launch.py lets only a test marked ``multiprocess`` start ranks."""
    from tests import launch

    launch.current.update(multiprocess=item.get_closest_marker("multiprocess") is not None, launches=0)


# Fixtures that started a launcher when they were set up (a module-scoped run that several tests read).
LAUNCHING_FIXTURES: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Note the fixtures that launch: a test that reads one launched, even when an earlier test set it up."""
    from tests import launch

    before = launch.current["launches"]
    yield
    if launch.current["launches"] > before:
        LAUNCHING_FIXTURES.add(fixturedef.argname)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test marked ``multiprocess`` that started no launcher, itself or through a fixture, fails: ``-m "not
    multiprocess"`` is every unit test."""
    from tests import launch

    report = (yield).get_result()
    if (
        report.when == "call"
        and report.passed
        and item.get_closest_marker("multiprocess")
        and not launch.current["launches"]
        and not LAUNCHING_FIXTURES.intersection(item.fixturenames)
    ):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} is marked multiprocess but started no launcher (tests/launch.py): unmark it"


# The cluster fixtures (Open MPI, a local SLURM) for every test module that names them.
from tests.cluster_fixtures import cluster_tools, slurm_cluster  # noqa: E402, F401
from tests.served_fixtures import served, served_start  # noqa: E402, F401  (one real vLLM server per test run)
