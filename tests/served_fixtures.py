"""A real vLLM server for the served-teacher tests: a tiny Llama with a character tokenizer of under 64 tokens (so a
top-64 from the server is the teacher's whole distribution), started once per test run on 127.0.0.1 from the
environment ``scripts/setup_vllm.sh`` makes (``.venv-vllm``) as the session starts (when a selected test needs it), and
stopped at the end (no process left)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CHARS = "abcdefghijklmnopqrstuvwxyz .,?!'0123456789\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = "the quick brown fox jumps over a lazy dog while small cats sleep in warm sun. what is it? 42 birds!".split()


def make_char_tokenizer(dir) -> object:
    """A character-level fast tokenizer (one id per character of CHARS, 4 specials first: 47 ids), bos added like
    Llama's; saved to ``dir`` as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(dir)
    return tok


def write_text_data(path: Path, n: int = 64, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))}) + "\n")
    return str(path)


def write_prompt_data(path: Path, n: int = 6) -> str:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i}", "prompt": " ".join(WORDS[i : i + 3])}) + "\n")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model: str, port: int, log_path: Path, cache_dir: Path, max_logprobs: int = 64) -> subprocess.Popen:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("DS_ACCELERATOR", None)
    cmd = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-logprobs",
        str(max_logprobs),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--seed",
        "0",
    ]
    # Its own process group: the server's worker processes are stopped with it.
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def group_processes(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def shm_segments(pgid: int) -> set[Path]:
    """The /dev/shm files the processes of group ``pgid`` map (vLLM's shared-memory message queues, 160-240 MiB
    each)."""
    found = set()
    for p in group_processes(pgid):
        try:
            found |= {Path(m.path) for m in p.memory_maps(grouped=True) if m.path.startswith("/dev/shm/")}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop(proc: subprocess.Popen, grace: float = 15.0) -> list[Path]:
    """Stop the server and its whole process group; returns the /dev/shm segments it left behind, now removed.

    SIGTERM first; once the server has exited, the rest of its group (the engine core, multiprocessing's resource
    tracker) gets ``grace`` s to finish its own clean-up before SIGKILL. A server killed before its clean-up leaves
    its shared-memory segments in /dev/shm (every time when SIGKILLed; two, 400 MiB of RAM until reboot, were left
    after one CI run whose stop killed the group right after the server's exit). Whatever the server mapped and is
    still there after that is removed here."""
    segments = shm_segments(proc.pid) if proc.poll() is None else set()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    deadline = time.monotonic() + grace
    while group_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:  # workers that outlived the grace period
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    left = sorted(path for path in segments if path.exists())
    for path in left:
        path.unlink(missing_ok=True)
    return left


class Server:
    """A vLLM server being started in the background: a thread waits until it answers and sends it one request (vLLM's
    first request after an eager start warms it up, tens of seconds on CPU); ``ready()`` waits for that thread."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, timeout: float):
        self.proc, self.url, self.log_path, self.error = proc, url, log_path, ""
        self.thread = threading.Thread(target=self._start, args=(timeout,), name="vllm-start", daemon=True)
        self.thread.start()

    def _start(self, timeout: float) -> None:
        from ds_distill.teachers.server_client import ServerClient

        deadline = time.monotonic() + timeout
        client = ServerClient(self.url, retries=0, timeout=timeout)
        while True:
            if self.proc.poll() is not None:
                self.error = f"vLLM exited with {self.proc.returncode}"
                return
            try:
                client.wait_ready(timeout=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.error = f"vLLM not ready in {timeout:.0f} s"
                    return
        try:
            client.prompt_logprobs([[1, 5, 6, 7]], 1)
        except Exception as exc:  # the tests' own requests report it again, with their context
            self.error = f"vLLM's first request failed: {exc}"

    def ready(self) -> None:
        self.thread.join()
        if self.error:
            pytest.fail(f"{self.error}: {self.log_path.read_text()[-3000:]}")


@pytest.fixture(scope="session", autouse=True)
def served_start(request, tmp_path_factory):
    """Starts the vLLM server of ``served`` when the session starts, if a selected test names ``served``: its
    start-up (1-3 minutes on CPU, plus the first request's warm-up) then overlaps the tests that run before the
    served ones instead of stalling the first of them (docs/performance.md, the suite's time). Yields (the tiny
    teacher, student and data; the Server, or None for an external one), or None when no selected test needs it."""
    if not any("served" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    if not VLLM_PYTHON.is_file():
        yield None  # ``served`` fails, naming the fix
        return
    from tests import tiny

    root = tmp_path_factory.mktemp("served")
    tok = make_char_tokenizer(root / "tok")
    # head_dim 32: a size vLLM's CPU attention supports
    teacher = tiny.make_model(root / "teacher", tok, layers=2, hidden=64, heads=2, seed=1)
    student = tiny.make_model(root / "student", tok, layers=1, hidden=64, heads=2, seed=2)
    data = {
        "teacher": teacher,
        "student": student,
        "tokenizer": tok,
        "data": write_text_data(root / "train.jsonl"),
        "prompts": write_prompt_data(root / "prompts.jsonl"),
        "root": root,
    }
    external = os.environ.get("DS_DISTILL_TEST_VLLM_URL")
    if external:  # a server already serving this same seeded teacher (while writing tests: no 1-3 minute start)
        yield {**data, "url": external}, None
        return
    port = free_port()
    log_path = root / "vllm.log"
    proc = start_vllm(teacher, port, log_path, root / "vllm_cache")
    try:
        # 900 s: the start now shares the machine with the tests before the served ones
        yield {**data, "url": f"http://127.0.0.1:{port}"}, Server(proc, f"http://127.0.0.1:{port}", log_path, 900)
    finally:
        left = stop(proc)
        if left:
            warnings.warn(f"the vLLM server left {', '.join(map(str, left))} in /dev/shm after it stopped; removed")


@pytest.fixture(scope="session")
def served(served_start):
    """{"url", "teacher", "student", "tokenizer", "data", "prompts", "root"}: the tiny teacher served by a real vLLM
    server, started by ``served_start`` and ready (warmed up) here."""
    if served_start is None:
        pytest.fail("no .venv-vllm: run bash scripts/setup_vllm.sh (scripts/test.sh does)")
    data, server = served_start
    if server is not None:
        server.ready()
    return data
