"""Which data-parallel engine core runs a request (engine/dp_client.py asks; stdlib only).

The least-loaded core, counting the sequences each has unfinished (a request of n counts n, a
beam search its best_of beams, though only its n best come back): the client sees every
submission and every finished sequence, so it keeps the counts without asking the cores.
With prefix caching on, a prompt whose first blocks a core ran recently goes back to that core,
where those blocks are likely still cached, unless that core is busier than the least-loaded one
by more than affinity_slack(least load) (a quarter of it, at least 8); then it goes to the
least-loaded one, which becomes the prefix's new home.
"""

from __future__ import annotations

from collections import OrderedDict

# The prefix a request is matched on: its first full KV blocks, at most this many.
MAX_PREFIX_BLOCKS = 8
# Prefix keys remembered (least recently used dropped first): ~100 bytes each.
MAX_REMEMBERED_PREFIXES = 65536


def affinity_slack(min_load: int) -> int:
    """How many more unfinished sequences than the least-loaded core a core may have and still
    take a request whose prefix it holds: a quarter more, and 8 at least, so a light load goes
    where the cache is and a heavy one stays balanced within ~25%."""
    return max(8, min_load // 4)


class LoadBalancer:
    def __init__(self, num_cores: int, block_size: int, prefix_aware: bool = True,
                 max_remembered: int = MAX_REMEMBERED_PREFIXES):
        self.num_cores, self.block_size, self.prefix_aware = num_cores, block_size, prefix_aware
        self.max_remembered = max_remembered
        self.loads = [0] * num_cores  # unfinished sequences per core
        self.num_routed = [0] * num_cores  # requests per core since start
        self.num_prefix_routed = 0  # requests sent where their prefix was, not to the least-loaded
        self._owner: dict[str, int] = {}  # request id -> its core, while any sequence runs
        self._live: dict[str, set[int]] = {}  # request id -> indices of its unfinished outputs
        self._load: dict[str, int] = {}  # request id -> what it still counts on its core
        self._homes: OrderedDict[int, int] = OrderedDict()  # prefix key -> core that ran it last

    def route(self, request_id: str, prompt_token_ids: list[int], num_seqs: int,
              cache_salt: str | None = None, num_running: int | None = None) -> int:
        """Pick the core for a new request of `num_seqs` outputs and count it there as
        `num_running` sequences (default num_seqs; a beam search runs more beams than it
        returns, and they all end with its last output); a `cache_salt` keys its prefix apart
        (its blocks are shared only with requests of the same salt)."""
        num_running = num_seqs if num_running is None else max(num_running, num_seqs)
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        least = min(range(self.num_cores), key=lambda i: (self.loads[i], self.num_routed[i], i))
        core = least
        keys = self._prefix_keys(prompt_token_ids, cache_salt) if self.prefix_aware else []
        home = next((self._homes[k] for k in reversed(keys) if k in self._homes), None)
        if home is not None and home != least:
            min_load = self.loads[least]
            if self.loads[home] <= min_load + affinity_slack(min_load):
                core = home
                self.num_prefix_routed += 1
        for key in keys:
            self._homes[key] = core
            self._homes.move_to_end(key)
        while len(self._homes) > self.max_remembered:
            self._homes.popitem(last=False)
        self._owner[request_id] = core
        self._live[request_id] = set(range(num_seqs))
        self._load[request_id] = num_running
        self.loads[core] += num_running
        self.num_routed[core] += 1
        return core

    def owner(self, request_id: str) -> int | None:
        """The core running the request, or None once it ended (or was never routed)."""
        return self._owner.get(request_id)

    def finish(self, request_id: str, index: int) -> None:
        """Sequence `index` of the request ended (its core said so, or a stop string did);
        saying it twice counts once."""
        live = self._live.get(request_id)
        if live is None or index not in live:
            return
        live.discard(index)
        # The last output takes what is left (the beams past n); each other one, its sequence.
        done = 1 if live else self._load[request_id]
        self._load[request_id] -= done
        self.loads[self._owner[request_id]] -= done
        if not live:
            del self._live[request_id], self._owner[request_id], self._load[request_id]

    def forget(self, request_id: str) -> int | None:
        """The request ended as a whole (aborted, rejected); returns the core it was on."""
        core = self._owner.pop(request_id, None)
        if core is not None:
            del self._live[request_id]
            self.loads[core] -= self._load.pop(request_id)
        return core

    def _prefix_keys(self, ids: list[int], salt: str | None = None) -> list[int]:
        """One key per full block of the prompt's first MAX_PREFIX_BLOCKS, each chained over the
        blocks before it (as the block manager's cache keys are, the salt first): the i-th key
        says "these i + 1 blocks", so a longer match is a longer shared prefix."""
        bs = self.block_size
        keys, key = [], 0 if salt is None else hash(("salt", salt))
        for start in range(0, min(len(ids) // bs, MAX_PREFIX_BLOCKS) * bs, bs):
            key = hash((key, tuple(ids[start : start + bs])))
            keys.append(key)
        return keys
