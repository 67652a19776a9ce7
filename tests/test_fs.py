"""envmgr.fs: the file lock that removes its file."""

from __future__ import annotations

import threading
import time

import pytest

from envmgr.fs import file_lock


def test_a_removed_lock_file_still_lets_one_holder_in_at_a_time(tmp_path):
    """Eight threads take one lock 100 times each, each holder removing the file as it
    lets go: a waiter that got the lock of a removed file takes the new file's, so no two
    are ever inside together; the file is gone at the end."""
    path = tmp_path / "locks" / "env.lock"
    inside: list[int] = []
    overlaps: list[list[int]] = []

    def take(me: int) -> None:
        for _ in range(100):
            with file_lock(path, remove=True):
                inside.append(me)
                time.sleep(0.0005)  # long enough for another taker to come in, if it can
                if len(inside) > 1:
                    overlaps.append(list(inside))
                inside.remove(me)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert not path.exists()


def test_only_an_exclusive_lock_removes_its_file(tmp_path):
    with pytest.raises(ValueError, match="exclusive"), file_lock(tmp_path / "x", True, remove=True):
        pass
    with file_lock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").exists()  # the host's locks stay, as before
