"""Transparent huge pages for the process's large allocations: a choice a binary makes before it imports JAX.

A training step on XLA:CPU allocates its temporaries afresh at each call (activations kept for the backward pass:
1.4 GiB for the 34M-parameter benchmark model), and glibc maps them in 4 KiB pages: every step touches hundreds of
thousands of new pages and walks their page tables. glibc's `glibc.malloc.hugetlb=1` tunable asks the kernel for
2 MiB pages on those mappings (madvise), where its transparent huge pages are in `madvise` mode. glibc reads its
tunables once, when the process starts, so `reexec` starts the program again with the tunable set.
"""

import os
import sys
from platform import libc_ver

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
  """The kernel's transparent huge page mode: always, madvise, never, or unknown."""
  try:
    with open(THP_MODE) as f:
      return next(word[1:-1] for word in f.read().split() if word.startswith("["))
  except (OSError, StopIteration):
    return "unknown"


def reexec() -> None:
  """Runs this program again, in place (same pid, arguments and interpreter options), with glibc's huge-page
  tunable on, unless GLIBC_TUNABLES already says (`glibc.malloc.hugetlb=0` turns it off), the C library is not
  glibc, or the kernel's mode is not `madvise` (`always` gives huge pages anyway, `never` none)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables or libc_ver()[0] != "glibc" or thp_mode() != "madvise":
    return
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
