"""Running the server: the socket bound first (its address printed), the model loaded behind it, uvicorn, SIGTERM.

The socket is bound before anything loads, so `--port=0` reports the port the OS chose as the first stderr line,
and /health answers 503 while the checkpoint loads and the batch-1 path compiles. SIGTERM (or Ctrl-C) stops
accepting connections, ends every sequence with a final chunk (finish_reason "length") and exits once the
streams have closed.
"""

import contextlib
import pathlib
import signal
import socket
import sys
import threading

import jax
import uvicorn

from llama_hk import checkpoints
from llama_hk.errors import UserError
from llama_hk.inference.generator import Generator
from llama_hk.ops import lora
from llama_hk.serving.api import State, create_app
from llama_hk.serving.engine import Engine

GRACEFUL_SHUTDOWN_S = 8  # Within SIGTERM's 10 s: streams get their final chunk long before.


class _Server(uvicorn.Server):
  """uvicorn's server, ending the engine's sequences as soon as a signal arrives (not after the streams close)."""

  def __init__(self, config: uvicorn.Config, state: State):
    super().__init__(config)
    self.state = state

  @contextlib.contextmanager
  def capture_signals(self):
    """uvicorn's handlers without its re-raising of the signal at the end: a drained server exits with status 0."""
    previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)

  def handle_exit(self, sig, frame) -> None:
    if self.state.engine is not None:
      threading.Thread(target=self.state.engine.stop, daemon=True).start()
    super().handle_exit(sig, frame)


def _bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise UserError(f"--host={host} --port={port}: cannot bind ({e.strerror})") from None
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_seq_len: int | None = None, max_queue: int = 64, model_name: str | None = None,
          dtype: str | None = None, adapter: str | None = None, mesh=None) -> None:
  """Serves `checkpoint` (any kind `checkpoints.load` reads) until SIGTERM or SIGINT.

  Args:
    checkpoint: the checkpoint's path.
    host, port: where to listen (port 0: a free port, printed).
    max_batch: sequences decoded together; more wait in a queue of max_queue (then 503).
    max_seq_len: each sequence's context (prompt and completion), at most the model's (its default); a decode
      step reads the slots its rows reach soon (engine.SLOTS_AHEAD tokens ahead, bucketed), at most this many.
    model_name: the name requests must give (default: the checkpoint's file or directory name).
    dtype: parameter dtype (default: as stored).
    adapter: a PEFT LoRA adapter directory, merged into the served weights (a LoRA training model_dir's own
      adapter is merged without it).
    mesh: a `sharding.make_mesh` mesh over this host's devices to shard the parameters over (None: one device).
  """
  config = checkpoints.load_config(checkpoint)  # A bad path fails here, before the server starts.
  max_seq_len = config.max_seq_len if max_seq_len is None else max_seq_len
  if not 1 <= max_seq_len <= config.max_seq_len:
    raise UserError(f"--max_seq_len={max_seq_len}: must be in [1, {config.max_seq_len}] (the model's)")
  if mesh is not None and mesh.devices.size > jax.local_device_count():
    raise UserError(f"the sharding --gin_file's mesh spans {mesh.devices.size} devices, more than this host's "
                    f"{jax.local_device_count()}: bin/serve runs on one host")
  if max_batch < 1 or max_queue < 0:
    raise UserError(f"--max_batch={max_batch} must be >= 1 and --max_queue={max_queue} >= 0")
  name = model_name or pathlib.Path(checkpoint).name
  sock = _bind(host, port)
  bound_host, bound_port = sock.getsockname()[:2]
  print(f"serving {name} on http://{bound_host}:{bound_port}", file=sys.stderr, flush=True)
  state = State(name)
  server = _Server(uvicorn.Config(create_app(state), log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                  lifespan="off"), state)
  failure: list[str] = []

  def load():
    try:
      ckpt = checkpoints.load(checkpoint, dtype=dtype, adapter=adapter, mesh=mesh)
      if ckpt.tokenizer is None:
        raise UserError(f"{checkpoint}: the checkpoint carries no tokenizer")
      # Decoding reads each weight once a token: the adapter is folded into the served copy, as bin/generate does.
      params = ckpt.params if ckpt.lora is None else lora.merged(ckpt.params, ckpt.lora)
      generator = Generator(ckpt.config, params, ckpt.tokenizer, max_batch=max_batch, mesh=mesh)
      engine = Engine(generator, max_seq_len, max_queue)
      engine.start()
      engine.warm_up()
      state.engine = engine
      print(f"ready: {name}", file=sys.stderr, flush=True)
    except Exception as e:  # Reported by serve's caller once the server has stopped.
      failure.append(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
      server.should_exit = True

  threading.Thread(target=load, name="llama_hk-load", daemon=True).start()
  server.run(sockets=[sock])
  if state.engine is not None:
    state.engine.stop()
  if failure:
    raise UserError(failure[0])
