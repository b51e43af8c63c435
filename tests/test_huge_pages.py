"""llama_hk.huge_pages: bin/train's start-up re-execution with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from llama_hk import huge_pages

# Prints what the program sees after `reexec`: its pid, argv and the tunables.
PROGRAM = """
import os, sys
print(os.getpid(), flush=True)
from llama_hk import huge_pages
huge_pages.reexec()
print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"))
"""


def _run(env_tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if env_tunables is not None:
    env["GLIBC_TUNABLES"] = env_tunables
  out = subprocess.run([sys.executable, "-u", "-c", PROGRAM, "--flag=1"], env=env, capture_output=True, text=True,
                       check=True, timeout=60).stdout.split("\n")
  return out


@pytest.mark.skipif(huge_pages.thp_mode() != "madvise", reason="the kernel's transparent huge pages are not in "
                    "madvise mode here, so reexec does nothing")
def test_reexec_sets_the_tunable_in_place_once():
  first, second, third = _run(None)[:3]
  pid = first
  # The first run printed its pid and re-executed; the second prints it again (the same process), then its state.
  assert second == pid
  assert third == f"{pid} ['--flag=1'] glibc.malloc.hugetlb=1"


def test_reexec_keeps_what_glibc_tunables_already_says():
  first, second = _run("glibc.malloc.hugetlb=0")[:2]
  assert second == f"{first} ['--flag=1'] glibc.malloc.hugetlb=0"
  if huge_pages.thp_mode() == "madvise":
    lines = _run("glibc.malloc.arena_max=2")
    assert lines[2] == f"{lines[0]} ['--flag=1'] glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
