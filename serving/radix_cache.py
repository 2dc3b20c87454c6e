"""Prefix cache: a radix tree over token ids whose values are KV slots, with lock counts and LRU eviction."""

from __future__ import annotations

import time

import torch

from serving.memory import SlotAllocator


class _Node:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key=(), value=None, parent=None):
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.key: tuple[int, ...] = key
        self.value: torch.Tensor = value if value is not None else torch.empty(0, dtype=torch.int64)
        self.lock_ref = 0
        self.last_access = time.monotonic()


def _common_len(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, allocator: SlotAllocator, enabled: bool = True):
        self.allocator = allocator
        self.enabled = enabled
        self.root = _Node()
        self.root.lock_ref = 1
        self.evictable_size = 0  # slots held by the tree and not locked
        self.total_size = 0

    def match_prefix(self, tokens: list[int]) -> tuple[torch.Tensor, _Node]:
        """Longest cached prefix of `tokens`: its slots [P] and the deepest node (split at the match end)."""
        if not self.enabled or not tokens:
            return torch.empty(0, dtype=torch.int64), self.root
        node, values, pos = self.root, [], 0
        now = time.monotonic()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return slots, node

    def _split(self, node: _Node, n: int) -> _Node:
        """Split node's key at n; returns the new upper node holding key[:n]."""
        upper = _Node(node.key[:n], node.value[:n], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_access = node.last_access
        upper.children = {node.key[n]: node}
        node.parent.children[node.key[0]] = upper
        node.key, node.value, node.parent = node.key[n:], node.value[n:], upper
        return upper

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Cache tokens -> slots. Slots of an already-cached prefix are freed (the tree keeps its own).
        Returns the number of leading tokens that were already cached."""
        if not self.enabled:
            self.allocator.free(slots)
            return 0
        node, pos = self.root, 0
        now = time.monotonic()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                new = _Node(tuple(tokens[pos:]), slots[pos:].clone(), node)
                new.last_access = now
                node.children[tokens[pos]] = new
                self.evictable_size += len(new.key)
                self.total_size += len(new.key)
                break
            n = _common_len(child.key, tokens[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        dup = min(pos, len(tokens))
        if dup:
            # These positions already had cached slots; ours become duplicates.
            mine, theirs = slots[:dup], self._path_values(node)[:dup]
            self.allocator.free(mine[mine != theirs])
        return dup

    def _path_values(self, node: _Node) -> torch.Tensor:
        parts = []
        while node is not self.root:
            parts.append(node.value)
            node = node.parent
        return torch.cat(parts[::-1]) if parts else torch.empty(0, dtype=torch.int64)

    def inc_lock(self, node: _Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: _Node) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
            node = node.parent

    def evict(self, num_slots: int) -> int:
        """Free at least num_slots from unlocked leaves, least recently used first."""
        freed = 0
        while freed < num_slots:
            leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.last_access)
            for leaf in leaves:
                self.allocator.free(leaf.value)
                freed += len(leaf.key)
                self.evictable_size -= len(leaf.key)
                self.total_size -= len(leaf.key)
                del leaf.parent.children[leaf.key[0]]
                if freed >= num_slots:
                    break
        return freed

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def reset(self) -> None:
        for node in list(self._nodes()):
            if node is not self.root and node.lock_ref:
                raise RuntimeError("cannot reset the prefix cache while requests hold it")
        self.evict(self.total_size)
