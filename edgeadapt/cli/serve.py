"""``edgeadapt serve``: one base and its adapters behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("serve")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=FILE",
              help="An adapter served under NAME (repeat for more); NAME alone loads that adapter from --store.")
@click.option("--store", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="An adapter store (edgeadapt install): --adapter NAME and the admin endpoints load from it.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default; anything else exposes the model).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", default=None, help="Clients must send 'Authorization: Bearer KEY'.")
@click.option("--admin-key", default=None, help="Turns on /admin/adapters (load / unload), for this key only.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]), help="Engine (see generate --engine).")
@click.option("--weights", default="fp32", show_default=True, type=click.Choice(["fp32", "int4", "int8"]),
              help="onnxruntime: the float or a quantized base (export-base --onnx-quant).")
@click.option("--id", "base_id", default=None, help="The base's model id in /v1/models (default: BASE's folder name).")
@click.option("--max-rows", default=16, show_default=True, type=click.IntRange(1),
              help="Requests decoded together; more wait for a row.")
@click.option("--max-waiting", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a row; one more gets 429.")
@click.option("--threads", default=None, type=click.IntRange(1), help="Compute threads (default: the engine's).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (https://chat.example, or *) whose pages may call the server from a browser; "
                   "repeatable. Off by default: a page the user visits cannot drive the local model.")
def serve_cmd(base: Path, adapters: tuple[str, ...], store: Path | None, host: str, port: int, api_key: str | None,
              admin_key: str | None, engine: str, weights: str, base_id: str | None, max_rows: int, max_waiting: int,
              threads: int | None, cors_origins: tuple[str, ...]) -> None:
    """Serve BASE and its adapters: GET /v1/models, POST /v1/completions and /v1/chat/completions (streaming
    too), each request with its own adapter, concurrent requests decoded in one batch. Stops on SIGTERM."""
    import edgeadapt
    from edgeadapt.errors import MissingDependencyError, UsageError

    try:
        from edgeadapt.serve.app import Service, serve
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"edgeadapt serve needs uvicorn and starlette ({e}); "
                                     "pip install 'edgeadapt[serve]'") from None
    from edgeadapt.runtime.scheduler import scheduler_of

    m = edgeadapt.load(base, engine=engine, mode="live", weights=weights, threads=threads, store=store)
    for spec in adapters:
        name, _, file = spec.partition("=")
        if not name:
            raise UsageError(f"--adapter: expected NAME=FILE or NAME (from --store), found {spec!r}")
        if not file and store is None:
            raise UsageError(f"--adapter {spec}: expected NAME=FILE, or --store DIR to load NAME from")
        m.add_adapter(file or name, name=name)
    sched = scheduler_of(m)
    sched.max_rows, sched.max_waiting = max_rows, max_waiting
    svc = Service(m, base_id or base.resolve().name, api_key=api_key, admin_key=admin_key)
    click.echo(f"serving {svc.base_id} ({m.engine}, {weights}) with {sorted(m.adapters) or 'no adapters'} "
               f"on http://{host}:{port}/v1", err=True)
    # a thread per running or waiting request
    serve(svc, host, port, workers=max_rows + max_waiting + 16, cors_origins=cors_origins)


COMMANDS = [serve_cmd]
