"""The KV cache: rotated keys and values of a prefix of working-context entries.

Axes: ``b`` batch, ``k`` key/value heads, ``n`` capacity (entries the buffers can hold),
``p`` entries held, ``w`` entries of one pass, ``d`` head dim.
"""

from __future__ import annotations

import torch

from megacontext.rope import RopeConfig


class KVCache:
    """Rotated keys and values of a prefix of working-context entries, one pair per layer,
    and the entries' positions (what a sliding-window mask needs).

    Pass it to :meth:`BaseLM.forward` (``cache=``) to append a pass's entries; :meth:`truncate`
    drops everything from the first entry that changed (a refocus), so the unchanged prefix is
    never recomputed. Keys are stored rotated, so the cache is tied to one RoPE configuration:
    a pass with another one is refused until the cache is emptied.

    Storage is preallocated and grows by doubling: appending ``n`` entries one at a time copies
    O(n) values in all and reallocates O(log n) times (``reallocations`` counts them), where
    concatenating per step would copy O(n²). Truncation only moves the end marker.
    """

    def __init__(self) -> None:
        self.rope: RopeConfig | None = None
        self.reallocations = 0  # times the buffers were (re)allocated, all layers together
        self._keys: list[torch.Tensor] = []    # per layer [b, k, n, d]
        self._values: list[torch.Tensor] = []  # per layer [b, k, n, d]
        self._positions: torch.Tensor | None = None  # [b, n] float64
        self._length = 0   # entries every layer holds
        self._pending = 0  # entries of the pass in progress (written layer by layer)

    def __len__(self) -> int:
        return self._length

    @property
    def capacity(self) -> int:
        """Entries the current buffers hold before the next reallocation."""
        return 0 if self._positions is None else self._positions.shape[1]

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer the held keys ``[b, k, p, d]`` (views, not copies)."""
        return [k[:, :, :self._length] for k in self._keys]

    @property
    def values(self) -> list[torch.Tensor]:
        """Per layer the held values ``[b, k, p, d]`` (views, not copies)."""
        return [v[:, :, :self._length] for v in self._values]

    @property
    def positions(self) -> torch.Tensor | None:
        """The held entries' positions ``[b, p]`` float64 (None before the first pass)."""
        return None if self._positions is None else self._positions[:, :self._length]

    def pending_positions(self) -> torch.Tensor:
        """Positions ``[b, p + w]`` of the held entries and those of the pass in progress."""
        return self._positions[:, :self._length + self._pending]

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` entries (the buffers stay allocated for reuse)."""
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot truncate a cache of {len(self)} entries to {length}")
        self._length = length
        if length == 0:
            self.rope = None

    # -- one pass: begin, extend per layer, end ---------------------------------------------

    def begin(self, positions: torch.Tensor, batch: int) -> int:
        """Start a pass of ``positions`` (``[b, w]`` or ``[w]``) for a batch of ``batch``;
        make room for its entries and record their positions. Returns the entries before it."""
        w = positions.shape[-1]
        pos = positions.to(torch.float64).expand(batch, w)
        held = self._positions
        if held is not None and (held.shape[0] != batch or held.device != pos.device):
            if self._length:
                raise ValueError(f"the KV cache holds a batch of {held.shape[0]} on "
                                 f"{held.device}, this pass has {batch} on {pos.device}; "
                                 f"truncate the cache to 0 first")
            self._drop_buffers()  # empty: start over for another batch size or device
        if self._positions is None:
            self._positions = torch.empty(batch, 0, dtype=torch.float64, device=pos.device)
        self._reserve(self._length + w)
        self._positions[:, self._length:self._length + w] = pos
        self._pending = w
        return self._length

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this pass's keys/values ``[b, k, w, d]`` for ``layer``; return all held so far
        (``[b, k, p + w, d]`` views of the buffers)."""
        start, end = self._length, self._length + k.shape[2]
        if k.shape[2] != self._pending:
            raise ValueError(f"layer {layer} appends {k.shape[2]} entries, the pass began with "
                             f"{self._pending} (call begin() first)")
        if layer == len(self._keys):  # the first pass allocates each layer's buffers
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self._keys.append(k.new_empty(shape))
            self._values.append(v.new_empty(shape))
        keys, values = self._keys[layer], self._values[layer]
        if keys.dtype != k.dtype or keys.shape[1::2] != k.shape[1::2]:
            if start:
                raise ValueError(f"layer {layer}: cached keys are {keys.dtype} "
                                 f"{tuple(keys.shape)}, new ones {k.dtype} {tuple(k.shape)}")
            keys = k.new_empty((k.shape[0], k.shape[1], self.capacity, k.shape[3]))
            values = v.new_empty(keys.shape)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad
                                        or keys.requires_grad):
            # Under autograd, an earlier pass's graph may hold views of these buffers: write
            # into copies rather than change what it saved.
            keys, values = keys.clone(), values.clone()
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self._keys[layer], self._values[layer] = keys, values
        return keys[:, :, :end], values[:, :, :end]

    def end(self) -> None:
        """Finish the pass: its entries join the held prefix."""
        self._length += self._pending
        self._pending = 0

    # -- storage ---------------------------------------------------------------------------

    def _reserve(self, needed: int) -> None:
        """Grow every buffer to at least ``needed`` entries, at least doubling."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        held = self._length

        def grown(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = t.new_empty(shape)
            out.narrow(dim, 0, held).copy_(t.narrow(dim, 0, held))
            return out

        self._positions = grown(self._positions, 1)
        self._keys = [grown(k, 2) for k in self._keys]
        self._values = [grown(v, 2) for v in self._values]
        self.reallocations += 1

    def _drop_buffers(self) -> None:
        self._keys, self._values, self._positions = [], [], None
