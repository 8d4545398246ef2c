import random

import pytest

from loraplex.server.engine.block_manager import BlockManager, NoFreeBlocks


def test_random_admit_finish_cancel_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    lengths: dict[str, int] = {}
    refused = 0
    for step in range(5000):
        op = rng.random()
        if op < 0.4 or not lengths:  # admit
            sid, n = f"s{step}", rng.randint(1, 40)
            if bm.can_grow(sid, n):
                bm.grow(sid, n)
                lengths[sid] = n
            else:
                refused += 1
                with pytest.raises(NoFreeBlocks):
                    bm.grow(sid, n)
                assert bm.table(sid) == []  # a refused admission holds nothing
        elif op < 0.75:  # decode: one more token
            sid = rng.choice(list(lengths))
            if bm.can_grow(sid, lengths[sid] + 1):
                bm.grow(sid, lengths[sid] + 1)
                lengths[sid] += 1
        else:  # finish or cancel
            sid = rng.choice(list(lengths))
            assert bm.free(sid) == bm.blocks_for(lengths.pop(sid))
        bm.check()
        assert bm.num_used == sum(bm.blocks_for(n) for n in lengths.values())
    assert refused > 0  # the cache did fill up
    for sid in list(lengths):
        bm.free(sid)
    assert bm.num_free == 64
    bm.check()


def test_tables_hold_enough_blocks():
    bm = BlockManager(num_blocks=10, block_size=16)
    assert bm.grow("a", 17) == bm.table("a") and len(bm.table("a")) == 2
    bm.grow("a", 32)
    assert len(bm.table("a")) == 2
    bm.grow("a", 33)
    assert len(bm.table("a")) == 3
    assert not bm.can_grow("b", 16 * 8)
    assert bm.free("missing") == 0
