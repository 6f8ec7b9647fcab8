"""The HTTP server (``python -m kvtier.launch_server``).

Two processes. The API process runs uvicorn + FastAPI: it authenticates, validates, tokenizes
(chat template included), and streams answers; the scheduler process runs the engine loop, so
HTTP load never delays a step. They talk over two ZeroMQ ipc:// sockets in a temp directory.

    launch_server.py        CLI: flags, start order, signals (SIGTERM -> 503, abort, exit 0)
    scheduler_process.py    child process: Scheduler + message loop; parent-side handle
    ipc.py                  the messages between the two processes
    engine_client.py        asyncio client: per-request queues, control calls, death watch
    serving.py              shared by endpoints: validation, submission, disconnect -> abort
    openai_api.py           /v1/chat/completions, /v1/completions, /v1/models
    chat.py                 chat messages for templates, tools, a choice's final message
    native_api.py           /generate, /health, /get_server_info, /get_model_info,
                            /flush_cache, /metrics, /debug/check_integrity
    streaming.py            server-sent events
    tool_parser.py          tool calls out of generated text (--tool-call-parser qwen25 /
                            hermes), streamed argument by argument
    xml_tool_parser.py      Qwen3-Coder's XML tool calls (--tool-call-parser qwen3_coder)
    forced_calls.py         tool_choice "required" / a named function: the schema, the calls
    json_stream.py          a JSON value re-serialised as it streams (calls' arguments)
    reasoning_parser.py     a reasoning model's thinking apart (--reasoning-parser)
    text_stream.py          what the stream parsers share
    protocol.py             pydantic request bodies
    middleware.py           503 while draining, 401 API key, 413 body size
    errors.py               {"error": {"message", "type", "code"}} for every failure
    metrics.py              Prometheus registry of the server

Status codes: 400 invalid request (FastAPI's 422 included), 401 API key, 404 unknown model or
endpoint, 413 body over ``--max-request-body-bytes``, 429 over ``--max-queued-requests``,
499 (logged only) client gone, 500 engine failure or failed integrity check, 503 shutting down
or scheduler process dead.
"""
