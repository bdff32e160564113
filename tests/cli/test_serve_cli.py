"""``lorakit serve`` as a process: prints its URL, binds 127.0.0.1 by default, Ctrl-C (SIGINT) lets the request
in flight finish and exits 0; bad flags end with a one-line error and exit 2 before anything loads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorakit.cli.main import main

pytest.importorskip("fastapi")


def test_serve_prints_url_binds_loopback_and_drains_on_ctrl_c(tmp_path):
    import httpx

    from tests.serve.helpers import save_adapters, save_llama

    llama = save_llama(tmp_path / "llama")
    save_adapters(llama, tmp_path / "adapters", ["a"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli.main", "serve", "--model", str(llama),
                             "--adapters-dir", str(tmp_path / "adapters"), "--port", "0", "--max-batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://([\d.]+):(\d+))", line)
        assert match, line + proc.stderr.read()
        url, host = match.group(1), match.group(2)
        assert host == "127.0.0.1"
        done = []

        def long_request():
            r = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "the cat", "max_tokens": 40,
                                                          "temperature": 0}, timeout=120)
            done.append((r.status_code, r.json()["usage"]["completion_tokens"]))

        # 6 requests, one row at a time: the server stays busy for 6 generations, so Ctrl-C lands mid-work
        # even on a loaded machine (one short request could finish before the signal)
        threads = [threading.Thread(target=long_request) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while True:  # all 6 arrived (counted on arrival) and one is decoding
            text = httpx.get(url + "/metrics").text
            if 'lorakit_adapter_requests_total{model="a"} 6.0' in text and "lorakit_running_requests 1.0" in text:
                break
            assert time.monotonic() < deadline and len(done) < 6, text[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        interrupted_with = len(done)
        for t in threads:
            t.join(120)
        assert interrupted_with < 6, "every request ended before the signal: nothing was drained"
        assert done == [(200, 40)] * 6  # the ones in flight at Ctrl-C finished whole
        assert proc.wait(60) == 0
        assert "lorakit serve: stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--max-loaded-adapters", "-1"], "--max-loaded-adapters must be >= 1"),
    (["--adapter", "noequals"], "expected NAME=DIR"),
    (["--api-key", " "], "--api-key is empty"),
    (["--timeout-keep-alive", "0"], "--timeout-keep-alive must be a positive number of seconds, got 0.0"),
    (["--timeout-keep-alive", "nan"], "--timeout-keep-alive must be a positive number of seconds, got nan"),
    (["--adapters-dir", "/nonexistent/dir"], "is not a directory"),
])
def test_bad_flags(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error: ") and message in err[0]


def test_default_adapters_are_lorakit_train_runs(tmp_path, monkeypatch):
    from lorakit.cli.serve import _default_adapters

    for run in ("sst2-minilm", "other"):
        (tmp_path / "runs" / run / "adapter").mkdir(parents=True)
        (tmp_path / "runs" / run / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "runs" / "sst2-minilm" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert _default_adapters() == {"sst2-minilm": Path("runs/sst2-minilm/adapter")}  # "other" has no weights
