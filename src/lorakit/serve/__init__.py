"""``lorakit serve``: one frozen base model, many adapters, one HTTP server (needs ``lorakit[serve]``).

    from lorakit.serve.app import build_engine, create_app
    app = create_app(build_engine("path/to/base", adapters_dir="adapters/"))   # then uvicorn.run(app)

protocol.py (pydantic request/response models) -> app.py (FastAPI routes, guard.py middleware) ->
engine.py (scheduler, continuous batching; batch.py: the running batch's KV cache) -> adapters.py (known and
loaded adapters, LRU) -> lorakit.ops.pool (the resident stacked adapter pool).
"""
