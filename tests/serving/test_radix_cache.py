import torch

from serving.memory import SlotAllocator
from serving.radix_cache import RadixCache


def test_match_insert_split_and_evict():
    alloc = SlotAllocator(101)
    cache = RadixCache(alloc)
    a = alloc.alloc(6)
    cache.insert([1, 2, 3, 4, 5, 6], a)
    slots, node = cache.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == a[:3].tolist()
    # Inserting a sequence that shares a prefix frees the duplicate slots and keeps the cached ones.
    b = alloc.alloc(5)
    dup = cache.insert([1, 2, 3, 7, 8], torch.cat([a[:3], b[3:]]))
    assert dup == 3
    assert cache.total_size == 8
    free_before = alloc.num_free
    cache.inc_lock(node)
    assert cache.evict(100) == 5  # only the unlocked branches [4,5,6] and [7,8]
    assert alloc.num_free == free_before + 5
    assert cache.match_prefix([1, 2, 3, 4])[0].numel() == 3
    cache.dec_lock(node)
    cache.evict(100)
    assert alloc.num_free == alloc.capacity - 3  # b[:3] were allocated and never cached
    assert cache.total_size == 0


def test_duplicate_slots_are_freed():
    alloc = SlotAllocator(50)
    cache = RadixCache(alloc)
    first = alloc.alloc(4)
    cache.insert([1, 2, 3, 4], first)
    second = alloc.alloc(4)
    cache.insert([1, 2, 3, 4], second)  # same tokens computed again by another request
    cache.evict(10)
    assert alloc.num_free == alloc.capacity


def test_disabled_cache_frees_everything():
    alloc = SlotAllocator(20)
    cache = RadixCache(alloc, enabled=False)
    cache.insert([1, 2, 3], alloc.alloc(3))
    assert alloc.num_free == alloc.capacity
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
