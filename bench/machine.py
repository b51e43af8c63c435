"""The machine a bench figure came from: CPU model, family and the vector flags that change kernels, cores, and
the versions of JAX and torch, so that every figure is printed beside the machine it holds for."""

import importlib.metadata
import os
import pathlib
import platform

# The flags that decide which matrix kernels XLA:CPU and torch pick (FMA-256, AVX-512, bfloat16 dot products, AMX).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
  """The first processor's /proc/cpuinfo fields (empty where there is none)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return {}
  fields = {}
  for line in text.split("\n\n", 1)[0].splitlines():
    name, _, value = line.partition(":")
    fields[name.strip()] = value.strip()
  return fields


def cpu_model() -> str:
  """The CPU's model name, with its family and model numbers where the name alone does not tell generations apart
  (a hypervisor may report just "AMD EPYC")."""
  info = _cpuinfo()
  name = info.get("model name") or platform.processor() or "unknown CPU"
  if "cpu family" in info and "model" in info:
    name += f" (family {info['cpu family']}, model {info['model']})"
  return name


def cpu_flags() -> list[str]:
  """The KERNEL_FLAGS this CPU has."""
  flags = set(_cpuinfo().get("flags", "").split())
  return [flag for flag in KERNEL_FLAGS if flag in flags]


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def describe() -> str:
  """One line: CPU model, its kernel flags, cores, and the jax, jaxlib and torch versions."""
  versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "torch"))
  return f"CPU: {cpu_model()}; flags {' '.join(cpu_flags()) or 'none of ' + ' '.join(KERNEL_FLAGS)}; " \
         f"{os.cpu_count()} cores; {versions}"
