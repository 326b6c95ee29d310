"""Servers the tests start as processes: `transformers serve` running the tiny organism (the backend
tests and `benchmarks/sweep_throughput.py`) and JupyterLab (the browser test). Plain context managers,
so a benchmark needs nothing from pytest."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(model_dir: Path, *, startup_s: float = 240.0):
    """Yield the ``/v1`` URL of `transformers serve` on 127.0.0.1 with the tiny organism in float32.

    ``model_dir`` is an empty folder to build the served checkpoint in (config files copied, weights
    linked, the tokenizer saved with our ``qwen3.5-small`` template); the server is stopped on exit.
    """
    from qwen35_lab.chat_format import TEMPLATES
    from qwen35_lab.tokenizer import get_tokenizer

    organism = ROOT / "data" / "organisms" / "tiny"
    model_dir = Path(model_dir)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        shutil.copy(organism / name, model_dir / name)
    (model_dir / "model.safetensors").symlink_to(organism / "model.safetensors")
    tokenizer = get_tokenizer()
    tokenizer.chat_template = TEMPLATES["qwen3.5-small"]
    tokenizer.save_pretrained(model_dir)
    tokenizer.chat_template = None

    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", "float32"]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, health=f"{url}/health", log_path=model_dir / "serve.log", what="transformers serve",
                        startup_s=startup_s, env=env):
        yield f"{url}/v1"


@contextlib.contextmanager
def server_process(cmd: list[str], *, health: str, log_path: Path, what: str, startup_s: float,
                   env: dict | None = None, cwd: Path | None = None):
    """Run ``cmd`` in its own process group until ``GET health`` answers 200, then yield.

    A server that exits or does not answer in ``startup_s`` is an error carrying the tail of its log;
    on exit the whole group (the server and anything it started) gets SIGTERM, then SIGKILL after 20 s.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited ({proc.returncode}):\n" + Path(log_path).read_text()[-3000:])
                try:
                    if httpx.get(health, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not come up in {startup_s:.0f} s:\n"
                                       + Path(log_path).read_text()[-3000:])
                time.sleep(0.5)
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
