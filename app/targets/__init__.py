"""Where a request can run: the local engine (the in-process API stack) or an upstream
OpenAI-compatible server, and the routes that chain them with fallback.

config.py (the `[[upstreams]]` / `[[routes]]` tables), upstream.py (one pooled httpx client,
health, breaker and in-flight cap per upstream), resolve.py (a client's model name -> an
ordered chain), forward.py (one request to one upstream, its answer relayed), relay.py (the
SSE / JSON rewriting on the way: `model` renamed, usage read), middleware.py (the chain walk:
fallback only before the first byte went to the client; local targets).
"""
