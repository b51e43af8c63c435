"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, and /health, over an Engine.

Each request's choices go to the engine as one submission; their Outputs come back on the engine's thread and
are handed to the request's event loop through an asyncio queue. A stream is server-sent events (`data: {...}`,
then `data: [DONE]`); a stream whose client goes away cancels its sequences, which frees their rows before the
engine's next decode call.
"""

import asyncio
import json
import time

import fastapi
from fastapi import responses
from starlette.exceptions import HTTPException

from llama_hk.errors import UserError
from llama_hk.serving import protocol
from llama_hk.serving.engine import Busy, Engine

RETRY_AFTER_S = 1  # What a 503 for a full queue asks clients to wait.


class State:
  """What the app serves: the engine once the model is loaded and its first bucket compiled (None before)."""

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.engine: Engine | None = None
    self.created = int(time.time())


def _error(e: protocol.ApiError, headers: dict | None = None) -> responses.JSONResponse:
  return responses.JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(body) -> str:
  return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(state: State) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="llama_hk", docs_url=None, redoc_url=None)

  @app.exception_handler(HTTPException)
  async def http_error(request, e: HTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(protocol.ApiError(e.status_code, str(e.detail), type_=kind))

  @app.exception_handler(protocol.ApiError)
  async def api_error(request, e: protocol.ApiError):
    return _error(e)

  @app.get("/health")
  async def health():
    if state.engine is None:
      return responses.JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "llama_hk"}]}

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request):
    return await _serve(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request):
    return await _serve(request, chat=True)

  async def _serve(request: fastapi.Request, chat: bool):
    engine = state.engine
    if engine is None:
      return _error(protocol.ApiError(503, "the model is loading", type_="service_unavailable"),
                    {"Retry-After": str(RETRY_AFTER_S)})
    try:
      body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise protocol.bad(f"the request body is not valid JSON ({e})") from None
    try:
      parsed = protocol.parse(body, chat=chat, tokenizer=engine.tokenizer, served=state.model_name,
                              max_seq_len=engine.max_seq_len, vocab_size=engine.config.vocab_size)
    except UserError as e:  # The chat template's own errors.
      raise protocol.bad(str(e), "messages") from None
    response = protocol.Response(parsed, engine.tokenizer)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    try:
      jobs = engine.submit(parsed.requests(), lambda i, out: loop.call_soon_threadsafe(queue.put_nowait, (i, out)))
    except Busy as e:
      return _error(protocol.ApiError(503, f"the server is busy: {e}", type_="service_unavailable"),
                    {"Retry-After": str(RETRY_AFTER_S)})
    except UserError as e:
      raise protocol.bad(str(e), "prompt") from None
    if parsed.stream:
      return responses.StreamingResponse(_stream(response, queue, jobs), media_type="text/event-stream")
    try:
      while not response.done:
        i, out = await queue.get()
        response.choices[i].add(out)
    finally:
      for job in jobs:
        job.cancel()
    errors = [c.error for c in response.choices if c.error]
    if errors:
      return _error(protocol.ApiError(500, errors[0], type_="server_error"))
    return response.body()

  async def _stream(response: protocol.Response, queue: asyncio.Queue, jobs):
    try:
      for chunk in response.first_chunks():
        yield _sse(chunk)
      while not response.done:
        i, out = await queue.get()
        choice = response.choices[i]
        delta = choice.add(out)
        if choice.error:
          yield _sse(protocol.ApiError(500, choice.error, type_="server_error").body())
          return
        if delta["text"] or delta["entries"] or delta["finish_reason"]:
          yield _sse(response.chunk([choice.chunk(delta)]))
      if response.parsed.include_usage:
        yield _sse(response.chunk([], usage=True))
      yield "data: [DONE]\n\n"
    finally:
      for job in jobs:
        job.cancel()

  return app
