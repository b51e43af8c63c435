"""The model's one configuration: a frozen, hashable dataclass (usable as a jit static argument).

Presets are gin files under `gin/models/`; `from_hf_config` reads a Hugging Face `config.json`. A family (FAMILIES)
is a LLaMA with a few settings of its own, not another model: Mistral's optional sliding window, Qwen2's q/k/v
biases (parameter-table rows of their own, params.py).
"""

import dataclasses
import json
from typing import Any

from llama_hk.errors import UserError

ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# param_dtype may also be "int8": int8 matrix weights with float32 scales, every other leaf float32 (params.py).
PARAM_DTYPES = DTYPES + ("int8",)
REMAT_POLICIES = ("none", "full", "dots")
# Attention without a KV cache (ops.attention.IMPLS); with a cache the model runs ops.attention's "cached" kernels.
ATTENTION_IMPLS = ("split_causal", "reference", "jax", "cudnn", "splash", "splash_interpret")
# Family -> its Hugging Face architecture; the family is also its HF model_type.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MISTRAL_SLIDING_WINDOW = 4096  # transformers' MistralConfig default, for a config.json without the key.


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes, numerics and dtypes of a LLaMA-family decoder."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  d_ff: int
  head_dim: int | None = None  # None: d_model // num_heads.
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: str = "none"  # One of ROPE_SCALINGS.
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 scaling only.
  rope_high_freq_factor: float = 4.0  # llama3 scaling only.
  rope_original_max_len: int = 8192  # llama3 scaling only.
  tie_embeddings: bool = False
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat_policy: str = "none"  # Rematerialization in training: "none", "full" or "dots".
  # Run the layer scan unrolled: straight-line code that XLA schedules and buffers across layers, without the
  # loop's per-layer slices and stacked residuals (the CPU train step's choice); compile time grows with depth.
  unroll_layers: bool = False
  attention_impl: str = "split_causal"  # One of ATTENTION_IMPLS.
  family: str = "llama"  # One of FAMILIES.
  sliding_window: int | None = None  # Mistral: a query sees this many most recent keys, itself included.
  # Per-frequency divisors of the inverse frequencies (K/2,), as a GGUF's rope_freqs.weight gives them (Llama-3.1).
  rope_freq_factors: tuple[float, ...] | None = None

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if self.rope_freq_factors is not None:  # A tuple, also when read back from JSON, so the config stays hashable.
      object.__setattr__(self, "rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
      if len(self.rope_freq_factors) != self.head_dim // 2:
        raise UserError(f"LlamaConfig.rope_freq_factors has {len(self.rope_freq_factors)} factors, "
                        f"head_dim={self.head_dim} needs {self.head_dim // 2}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff", "head_dim"):
      if getattr(self, name) <= 0:
        raise UserError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise UserError(f"LlamaConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise UserError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.remat_policy not in REMAT_POLICIES:
      raise UserError(f"LlamaConfig.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"LlamaConfig.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.compute_dtype not in ("bfloat16", "float16"):
      raise UserError(f"LlamaConfig.attention_impl='cudnn' needs compute_dtype 'bfloat16' or 'float16', not "
                      f"{self.compute_dtype!r}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise UserError(f"LlamaConfig.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
    for name, allowed in (("param_dtype", PARAM_DTYPES), ("compute_dtype", DTYPES)):
      if getattr(self, name) not in allowed:
        raise UserError(f"LlamaConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
    if self.family not in FAMILIES:
      raise UserError(f"LlamaConfig.family={self.family!r} is not one of {tuple(FAMILIES)}")
    if self.sliding_window is not None and self.family != "mistral":
      raise UserError(f"LlamaConfig.sliding_window={self.sliding_window} needs family 'mistral', not {self.family!r}")
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise UserError(f"LlamaConfig.sliding_window must be positive or None, got {self.sliding_window}")

  @property
  def float_param_dtype(self) -> str:
    """The dtype of the parameters that are not int8: param_dtype, or float32 under int8 weights."""
    return "float32" if self.param_dtype == "int8" else self.param_dtype

  @property
  def qkv_bias(self) -> bool:
    """Whether the q, k and v projections add a bias (Qwen2)."""
    return self.family == "qwen2"

  @property
  def heads_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str = "config") -> "LlamaConfig":
    try:
      fields = json.loads(text)
      return cls(**fields)
    except (json.JSONDecodeError, TypeError) as e:
      raise UserError(f"{source}: not a llama_hk config ({e})") from None


def num_params(config: LlamaConfig, with_lm_head: bool | None = None) -> int:
  """Parameter count; `with_lm_head` defaults to whether the config has an untied head."""
  d, k = config.d_model, config.head_dim
  attention = d * k * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = 3 * d * config.d_ff
  bias = k * (config.num_heads + 2 * config.num_kv_heads) if config.qkv_bias else 0
  per_layer = attention + bias + mlp + 2 * d
  with_lm_head = (not config.tie_embeddings) if with_lm_head is None else with_lm_head
  head = config.vocab_size * d if with_lm_head else 0
  return config.vocab_size * d + config.num_layers * per_layer + d + head


def _rope_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """Reads RoPE settings from either `rope_parameters` (current) or `rope_theta`/`rope_scaling` (older)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  out: dict[str, Any] = {"rope_theta": float(theta)}
  if kind in ("default", None):
    return out
  if kind not in ("linear", "llama3"):
    raise UserError(f"{source}: unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
  out["rope_scaling"] = kind
  out["rope_scaling_factor"] = float(merged["factor"])
  if kind == "llama3":
    out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
    out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
    out["rope_original_max_len"] = int(merged["original_max_position_embeddings"])
  return out


def _family_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """The family's own fields: Mistral's window as transformers reads it (key absent: 4096; null: none), Qwen2's
  biases (implied by the family) without its sliding window."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UserError(f"{source}: model_type is {family!r}, supported: {', '.join(FAMILIES)}")
  if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    raise UserError(f"{source}: attention_bias/mlp_bias are not supported")
  if family == "qwen2" and hf.get("use_sliding_window"):
    raise UserError(f"{source}: use_sliding_window is true; Qwen2's sliding window is not supported")
  window = hf.get("sliding_window", MISTRAL_SLIDING_WINDOW) if family == "mistral" else None
  if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
    raise UserError(f"{source}: sliding_window is {window!r}, not an integer or null")
  return {"family": family, "sliding_window": window}


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> LlamaConfig:
  """LlamaConfig from a Hugging Face `config.json` dict of a LLaMA, Mistral or Qwen2 model."""
  family = _family_from_hf(hf, source)
  try:
    num_heads = hf["num_attention_heads"]
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if hf.get("hidden_act", "silu") != "silu":
      raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        d_ff=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        param_dtype=dtype if dtype in DTYPES else "float32",
        compute_dtype="float32",
        **_rope_from_hf(hf, source),
        **family,
    )
  except KeyError as e:
    raise UserError(f"{source}: missing field {e}") from None


def _family_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """The family's own `config.json` fields, as transformers' config class of that model_type names them."""
  if config.family == "mistral":
    return {"sliding_window": config.sliding_window}
  if config.family == "qwen2":
    return {"use_sliding_window": False, "sliding_window": None}
  return {"attention_bias": False, "mlp_bias": False}


def to_hf_config(config: LlamaConfig, dtype: str | None = None) -> dict[str, Any]:
  """A Hugging Face `config.json` dict (current `rope_parameters` layout) for `config`, under its family's
  model_type."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling != "none":
    rope.update(rope_type=config.rope_scaling, factor=config.rope_scaling_factor)
  if config.rope_scaling == "llama3":
    rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_len)
  return {
      "architectures": [FAMILIES[config.family]],
      "model_type": config.family,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "intermediate_size": config.d_ff,
      "rms_norm_eps": config.norm_eps,
      "hidden_act": "silu",
      **_family_to_hf(config),
      "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_seq_len,
      "rope_parameters": rope,
      # The older layout too, so that older transformers releases read the same model.
      "rope_theta": config.rope_theta,
      "rope_scaling": None if config.rope_scaling == "none" else rope,
      "dtype": dtype or config.param_dtype,
  }


def load_hf_config(path: str) -> LlamaConfig:
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
  except OSError as e:
    raise UserError(f"{path}: cannot read ({e.strerror})") from None
  return from_hf_config(hf, source=path)
