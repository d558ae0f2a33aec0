"""A `gearshift serve` process for the serving benchmarks: started on a free loopback port, its RSS readable,
stopped with SIGTERM (and killed if it does not go)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path) -> Path:
    """The test suite's tiny supernet (a converted 2-layer Llama, word-level tokenizer) with two presets."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import train_fixtures as fx
    from gearshift.model import Supernet

    if not (path / "config.json").exists():
        fx.supernet_dir(path)
        model = Supernet.from_pretrained(path)
        model.add_preset("quality", "FF", predicted_quality=0.9, speedup=1.0)
        model.add_preset("fast", "GG", predicted_quality=0.7, speedup=3.0)
        model.save_pretrained(path)
        fx.tokenizer().save_pretrained(path)
    return path


class ServerProcess:
    def __init__(self, checkpoint: str | Path, *flags: str, log: str | Path = "/dev/null") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gearshift", "serve", str(checkpoint), "--port", str(self.port), *flags]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("the server did not start within 10 minutes")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=10)
        return {"status_code": r.status_code, **r.json()}

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()
