"""The OpenAI-compatible HTTP API: the same runs, limits, queue and log as `exoctl run`.

errors   every failure as an HTTP status and OpenAI's error body (pure)
schema   request bodies checked and turned into RunRequests (pure)
render   responses, stream chunks and server-sent events (pure)
auth     the Host allowlist and the API key (pure, but for reading the key file)
stream   one run delivered whole or as events; a client that leaves cancels it
app      the routes and the guard in front of them (Starlette)
server   uvicorn inside exod's event loop
"""
