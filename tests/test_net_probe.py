"""`--preset base` without weights fails within seconds, with or without the offline switches;
with a reachable hub the libraries still try their download. Real sockets on 127.0.0.1."""

import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import models

REPO = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE")


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404 and remembers the paths asked for."""

    paths: list[str] = []

    def _not_found(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _not_found

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub_server():
    _Hub.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_probe_of_a_listening_server_and_a_closed_port(hub_server, monkeypatch):
    port = hub_server.server_address[1]
    monkeypatch.setenv(models.PROBE_ENV, f"127.0.0.1:{port}")
    assert models.hub_unreachable("https://huggingface.co") is None
    monkeypatch.setenv(models.PROBE_ENV, f"127.0.0.1:{_closed_port()}")
    monkeypatch.setenv(models.PROBE_TIMEOUT_ENV, "2")
    start = time.perf_counter()
    reason = models.hub_unreachable("https://huggingface.co")
    assert (
        reason.startswith("no network: cannot reach 127.0.0.1:")
        and time.perf_counter() - start < 2.5
    )
    monkeypatch.setenv(models.PROBE_ENV, "off")
    assert models.hub_unreachable("https://huggingface.co") is None


def test_probe_gives_up_after_its_timeout(monkeypatch):
    """A connect that hangs (here: name resolution made slow) is abandoned after the timeout."""
    real = socket.create_connection

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", slow)
    start = time.perf_counter()
    error = models._tcp_connect_error("127.0.0.1", _closed_port(), 0.5)
    assert error == "no answer within 0.5 s" and time.perf_counter() - start < 1.5


def test_probe_targets(monkeypatch):
    for name in (models.PROBE_ENV, "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert models.probe_target("https://huggingface.co") == ("huggingface.co", 443)
    assert models.probe_target("http://127.0.0.1:8080/x") == ("127.0.0.1", 8080)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")  # downloads go through it
    assert models.probe_target("https://huggingface.co") == ("proxy.local", 3128)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    return dict(env, PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1", **extra)


def _embed_base(tmp_path, env) -> tuple[subprocess.CompletedProcess, float]:
    from labeling_inputs import write_labeling_inputs

    paths = write_labeling_inputs(tmp_path / "in", n=4)
    args = ["--entities", paths["entities"], "--relations", paths["relations"]]
    cmd = [sys.executable, "-m", "pipeline", "embed-prompts", "--preset", "base", *args]
    cmd += ["--out", tmp_path / "prompts.safetensors"]
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize("offline_vars", [False, True])
def test_base_without_weights_fails_fast_with_or_without_offline_vars(tmp_path, offline_vars):
    env = _env(
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache
        **{models.PROBE_ENV: f"127.0.0.1:{_closed_port()}"},
        **({v: "1" for v in OFFLINE_VARS} if offline_vars else {}),
    )
    proc, seconds = _embed_base(tmp_path, env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: cannot load CLIP ViT-B-32/openai") and len(lines) <= 2
    assert "--preset tiny" in proc.stderr and "Retrying" not in proc.stderr
    if not offline_vars:
        assert "no network: cannot reach 127.0.0.1:" in lines[0]
    # Mostly imports (~5 s on an idle 2-core machine, more when it is busy); the hub retries
    # this replaces slept 46 s on top of them.
    assert seconds < 40, seconds


def test_base_load_without_network_takes_well_under_a_second(tmp_path, monkeypatch, caplog):
    """In-process, with the offline switches off (also the one huggingface_hub read at import)
    and an empty cache: without the probe this load would retry the hub for ~46 s."""
    import huggingface_hub.constants as hub_constants

    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv(models.PROBE_ENV, f"127.0.0.1:{_closed_port()}")
    import open_clip  # noqa: F401  (imports are not what is timed)

    start = time.perf_counter()
    with pytest.raises(models.WeightsUnavailable, match="no network: cannot reach 127.0.0.1"):
        models.load_clip("base")
    assert time.perf_counter() - start < 5.0
    assert hub_constants.HF_HUB_OFFLINE is False  # the session switched it back
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_base_with_a_reachable_hub_still_downloads(tmp_path, hub_server):
    """The probe passes, so transformers asks the hub (here a local one that has nothing)."""
    port = hub_server.server_address[1]
    code = (
        "from pipeline.models import WeightsUnavailable, load_tokenizer\n"
        "try:\n    load_tokenizer('base')\n"
        "except WeightsUnavailable as e:\n    print('unavailable:', e)\n"
    )
    env = _env(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "unavailable: cannot load 'bert-base-uncased'" in proc.stdout, proc.stdout + proc.stderr
    assert "no network" not in proc.stdout
    assert any("bert-base-uncased" in p for p in _Hub.paths), _Hub.paths
