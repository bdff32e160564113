"""``lorakit serve``: one frozen base model, many adapters, one HTTP server (OpenAI-compatible + classify).

With no arguments it serves the packaged MiniLM with every adapter ``lorakit train`` left under
``./runs/*/adapter`` (named after the run folder).
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from .options import add_base_quantize

HELP = "Serve a base model and many adapters over HTTP (OpenAI-compatible completions/chat, classify, playground)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model directory or hub id (default: the first adapter's base model, or "
                                    "the packaged MiniLM when no adapter is given)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    p.add_argument("--adapters-dir", metavar="DIR",
                   help="serve every adapter subfolder of DIR under its folder name; the only root that "
                        "/v1/load_lora_adapter may read from")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per forward (requests decoded together)")
    p.add_argument("--max-loaded-adapters", type=int, default=8,
                   help="adapters kept in memory; the least recently used is evicted and reloaded on demand")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    add_base_quantize(p, default="the one the first adapter was trained on")


def _adapters(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def _default_adapters() -> dict[str, Path]:
    """``./runs/<run>/adapter`` of every ``lorakit train`` run, named ``<run>``."""
    from ..serve.adapters import NAME_RE, is_adapter_dir

    found = {}
    for path in sorted(Path("runs").glob("*/adapter")):
        if is_adapter_dir(path) and NAME_RE.fullmatch(path.parent.name):
            found[path.parent.name] = path
    return found


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for flag in ("max_batch_size", "max_loaded_adapters"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    adapters = _adapters(args.adapter)
    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else None
    if adapters_dir is not None and not adapters_dir.is_dir():
        raise FileNotFoundError(f"--adapters-dir {adapters_dir} is not a directory")
    model = args.model
    if model is None and not adapters and adapters_dir is None:
        from ..models import default_model_path

        model = default_model_path()
        adapters = _default_adapters()
        if not adapters:
            print("lorakit serve: no adapter under ./runs/*/adapter; make one with `lorakit train` "
                  "(serving the base model only)", file=sys.stderr)
    if model is None:
        from ..core.checkpoint import read_adapter
        from ..serve.adapters import discover

        first = next(iter(discover("", adapters, adapters_dir).values()), None)
        model = read_adapter(first.path)[0].base_model_name_or_path if first else None
        if not model:
            raise ValueError("pass --model (no adapter names its base model)")

    import uvicorn

    from ..serve.app import create_app
    from ..serve.loading import build_frontend

    sock = _bind(args.host, args.port)  # before loading: a port in use fails at once
    front = build_frontend(model, adapters, adapters_dir, args.max_batch_size, args.max_loaded_adapters,
                           quantize=args.quantize or "auto")
    for info in front.store.known.values():  # unreadable, or tokens that conflict with another adapter's
        if info.error:
            print(f"lorakit serve: adapter {info.name!r} fails its requests: {info.error}", file=sys.stderr)
    app = create_app(front, api_key=args.api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lorakit serve: {front.store.base_name} ({front.task}) with {len(front.store.known)} adapter(s) "
          f"at http://{shown}:{port}  (playground: http://{shown}:{port}/)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn drained the requests in flight, then re-raised the signal
        pass
    print("lorakit serve: stopped", flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock
