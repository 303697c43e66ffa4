"""Serving: the models the site trained, over an OpenAI-compatible HTTP API on the site's own network.

    airlock keys create pacs-bridge --task chest-xray     # API keys: shown once, stored as SHA-256
    airlock serve --task qa --run xray=RUN [--detach]     # FastAPI + uvicorn, 127.0.0.1:8080 by default

Modules, one job each:
    cli, keys_cli   the `airlock serve` and `airlock keys` commands
    server          load, bind, run uvicorn, graceful SIGTERM; the `serve` job handler
    app             the HTTP endpoints, request envelope (auth, limits, logs without contents)
    openai_api      request validation and response shapes of the OpenAI API
    decoding        chat template, prompt limits, detokenizing, stop sequences
    backends        what runs a model (PyTorch, ONNX Runtime, TensorRT), one request or a batched forward pass
    batching        continuous batching: concurrent requests to one LM share its forward passes
    models          what a served name points at (a run, or a task's production version), loading
    hot_swap        follow promotions: load in the background, switch atomically
    limits          body/prompt/token caps, batch rows and workers, per-key concurrency, bounded queue (429/503)
    uploads         DICOM/PNG/JPEG for /v1/classify, parsed in memory with every length checked
    metrics         Prometheus text
    api_keys        key creation, revocation, constant-time authentication
Decisions: docs/adr/0008-serving.md, 0017-continuous-batching.md. Torch, transformers and FastAPI load only
when serving starts.
"""
