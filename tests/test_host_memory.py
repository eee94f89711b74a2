"""The worker keeps the host memory it frees for its next step: a large tensor freed and allocated
again does not page-fault all of its memory in again each time (in a fresh process: the setting is
the process's)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent(
    """
    import resource, sys, torch
    from tinker_server.worker.host_memory import keep_freed_memory

    if sys.argv[1] == "kept":
        assert keep_freed_memory()

    def step():  # two 40 MiB tensors: above the largest block glibc ever takes from its heap by itself
        inputs = torch.ones(10 << 20)
        return float((inputs * 2)[0])

    for _ in range(10):  # the heap settles
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True, capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_freed_tensor_is_reused_without_page_faults():
    pages = 10 * 2 * (40 << 20) // 4096  # of the 20 tensors allocated
    assert page_faults("default") > pages // 2  # each allocation maps, and faults in, fresh pages
    assert page_faults("kept") < pages // 10  # at most one tensor's in a while, as the heap's layout shifts
