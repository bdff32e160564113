"""``lorakit serve``: one frozen base model, many adapters, one HTTP server (needs ``lorakit[serve]``).

    from lorakit.serve.app import create_app
    from lorakit.serve.loading import build_frontend
    app = create_app(build_frontend("path/to/base", adapters_dir="adapters/"))   # then uvicorn.run(app)

Layers, each knowing only the ones below it::

    app.py          create_app: the routes, the guard middleware (guard.py), the error handlers (http.py)
    routes/         thin HTTP routes by API family: openai.py, vllm.py, admin.py; protocol.py: their models
    frontend.py     text in, text out: tokenizing, detokenizing, stop strings, token budgets, the hand-off
    engine.py       one thread, token ids only: scheduler, continuous batching (batch.py: the KV cache)
    sampling.py     each row's logits processors and sampler; structured.py: the JSON grammar processor
    jobs.py         the work the engine runs and the typed events it answers with; errors.py: typed errors
    adapters.py     known and loaded adapters (LRU) -> lorakit.ops.pool (the resident stacked adapter pool)
    loading.py      build_frontend: base model + adapters on disk -> engine -> front object
"""
