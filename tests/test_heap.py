"""Memory a checkpoint or a restore freed goes back to the kernel: the local stores' writer, which drops
the last reference to each batch of changelog values it wrote, hands the free heap back once idle."""

from __future__ import annotations

import os

from conftest import wait_until

from streamlstm.state import heap
from streamlstm.state.store import LocalStores, StoreMeta

VALUE_BYTES = 1_100  # a changelog value at H=64, 2 layers
VALUES = 120_000  # 132 MB of them


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def write_and_keep_some(tmp_path) -> tuple[LocalStores, int, list[bytes]]:
    """A restore's worth of values written to a store; every 64th kept alive, as long-lived objects
    allocated among them would be (the heap cannot just shrink from its top)."""
    stores = LocalStores(tmp_path, "trim")
    before = rss_bytes()
    entries = [(f"key-{i}", os.urandom(16) + bytes(VALUE_BYTES - 16)) for i in range(VALUES)]
    kept = [value for _, value in entries[::64]]
    stores.establish(0, entries, StoreMeta(stores.owner, 2, 64, "v", 0, 0), replace=True)
    del entries
    stores.wait()
    return stores, before, kept


def test_the_store_writer_gives_the_memory_of_what_it_wrote_back(tmp_path) -> None:
    stores, before, kept = write_and_keep_some(tmp_path)
    wait_until(lambda: rss_bytes() - before < VALUES * VALUE_BYTES / 4, 10, "the freed values' memory given back",
               lambda: f"{(rss_bytes() - before) / 2**20:.0f} MiB of {VALUES * VALUE_BYTES / 2**20:.0f} kept")
    stores.close()
    assert kept
