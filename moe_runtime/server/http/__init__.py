"""The OpenAI-compatible HTTP API, served beside gRPC by the same process and engine (`server.http_port`).

server.py (uvicorn in the serving loop), routes.py (Starlette routes, generation, drain), admission.py
(body -> engine request, off the event loop), schemas.py (request shapes), chat_template.py (the
checkpoint's template, rendered as transformers does), openai_format.py (response shapes), sse.py
(server-sent events), auth.py (Bearer token), errors.py (OpenAI's error shape).
"""
