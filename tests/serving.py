"""A real `transformers serve` process running the tiny organism, for the backend tests and
`benchmarks/sweep_throughput.py` (a plain context manager, so the benchmark needs nothing from pytest)."""

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
    log = open(model_dir / "serve.log", "w")
    cli = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited ({proc.returncode}):\n"
                                   + (model_dir / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not come up in {startup_s:.0f} s:\n"
                                   + (model_dir / "serve.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
