"""runtime helpers: heap release."""

import platform
import sys

import pytest
import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_release_free_heap_returns_freed_heap_pages():
    from rlhfstack.runtime import release_free_heap

    big = torch.ones(4 << 20)  # 16 MiB: freeing it raises glibc's mmap threshold above 1 MiB
    del big
    keep = torch.arange(10.0)
    chunks = [torch.ones(1 << 18) for _ in range(300)]  # 300 x 1 MiB on the heap, touched
    alive = chunks[1::2]  # every other one stays: 150 holes of 1 MiB that free() cannot trim
    del chunks
    before = _rss_mb()
    assert release_free_heap() is True
    after = _rss_mb()
    assert before - after > 100, (before, after)  # most of the 150 MiB of holes went back
    assert all(bool((t == 1).all()) for t in alive)  # live tensors untouched
    assert torch.equal(keep, torch.arange(10.0))


def test_run_logger_names_the_missing_wandb_package(tmp_path, monkeypatch):
    from rlhfstack.runtime import RunLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"logging.wandb=true needs the 'wandb' package"):
        RunLogger(tmp_path, tensorboard=False, wandb=True)
