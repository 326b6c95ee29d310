"""A capture / edit session: what the instrumented modules consult at each probe point.

The instrumented modules call ``session.point(name, x)`` at every probe; the
session applies the edits for that name and copies the selected slice of the
captured ones off the hot path (detached, to the capture device and dtype).
Positions are absolute token positions: the session knows where each forward
call starts (``offset``), so prefill and every cached decode step land in one
sequence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .edits import Edit
from .probes import as_index_list, layout, parse
from ..checks import BadIndex

__all__ = ["Session", "StateRecord"]


@dataclass
class StateRecord:
    """DeltaNet state checkpoints of one layer and what is needed to replay between them.

    ``checkpoints[p]`` is the state *before* token ``p`` is written
    (``[B, HV, K, V]``, fp32); the replay inputs (L2-normalised q and k per
    value head, v, g, β) are kept for every position.
    """

    chunk_size: int
    heads: list[int] | None
    checkpoints: dict[int, torch.Tensor] = field(default_factory=dict)
    final_position: int = 0
    final: torch.Tensor | None = None  # the state after the last token seen
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def finalize(self) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v, dim=1) for k, v in self.inputs.items()}


def _ix(lay: str, shape, sel: dict[str, list[int] | None], device) -> tuple | None:
    """An ``np.ix_``-style index over the leading B/T/H axes, or None when nothing is narrowed."""
    if all(sel.get(ch) is None for ch in lay):
        return None
    n = len(lay)
    idx = []
    for a, ch in enumerate(lay):
        chosen = sel.get(ch)
        t = torch.arange(shape[a], device=device) if chosen is None else torch.as_tensor(chosen, device=device)
        view = [1] * n
        view[a] = -1
        idx.append(t.view(view))
    return tuple(idx)


class Session:
    """State of one ``run`` / ``generate`` / ``trace``: capture selection, edits, storage."""

    def __init__(self, *, capture: list[str], edits: dict[str, Edit], positions=None, heads=None, batch=None,
                 device="cpu", dtype=None, chunk_size: int = 64, head_counts: dict[str, int] | None = None):
        self.capture = set(capture)
        self.edits = dict(edits)
        self.positions = None if positions is None else as_index_list(positions, None, "positions")
        self.heads = heads if heads is None else as_index_list(heads, None, "heads")
        self.batch = batch if batch is None else as_index_list(batch, None, "batch")
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.head_counts = head_counts or {}
        self.offset = 0  # absolute position of the current forward call's first token
        self.length = 0  # tokens in the current call
        self.seen = 0  # tokens seen in this sequence so far
        self.calls = 0
        self.token_chunks: list[torch.Tensor] = []  # input ids of each forward call
        self.ran_instrumented = set()  # probe families that went through the instrumented path
        self.store: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.store_positions: dict[str, list[int]] = defaultdict(list)
        self.states: dict[int, StateRecord] = {}
        self.layers_wanted: set[int] = set()
        for name in list(self.capture) + list(self.edits):
            layer, kind = parse(name)
            if layer is not None and name.startswith("layers."):
                self.layers_wanted.add(layer)

    # ------------------------------------------------------------- calls
    first_call_check = None  # (B, T) -> None; may raise before the first forward runs

    def begin_call(self, length: int, past_length: int | None, batch_size: int = 1, cached: bool = False) -> None:
        """Called before each model forward with the number of new tokens and the cache length.

        ``cached``: the call carries a cache, so later calls may follow (generation); without one the
        input is the whole sequence and memory edits at positions past it are refused here.
        """
        if self.calls == 0 and self.first_call_check is not None:
            self.first_call_check(batch_size, length)
        if self.calls == 0 and not cached:
            self._check_memory_edit_positions(length)
        if past_length is None:
            past_length = self.seen if self.calls else 0
        self.offset = past_length
        self.length = length
        self.seen = past_length + length
        self.calls += 1

    def _check_memory_edit_positions(self, length: int) -> None:
        """Refuse a memory write / erase at a position outside the input, before any work."""
        from ..checks import check_indices
        from .memory import MemoryEdit

        for name, edit in self.edits.items():
            if isinstance(edit, MemoryEdit) and edit.positions is not None:
                check_indices(f"positions of the edit on {name!r}", edit.positions, length,
                              what=f"the input ({length} tokens)")

    # -------------------------------------------------------- selections
    def wants(self, name: str) -> bool:
        return name in self.capture or name in self.edits

    def wants_layer(self, layer: int) -> bool:
        return layer in self.layers_wanted

    def _rel_positions(self, chosen: list[int] | None, t0: int, n: int) -> list[int] | None:
        """Positions (relative to ``x``'s first step) of the absolute ``chosen`` inside this call, or None = all."""
        if chosen is None:
            return None
        start = self.offset + t0
        return [p - start for p in chosen if start <= p < start + n]

    def _selection(self, name: str, x: torch.Tensor, t0: int, positions, heads, batch):
        lay = layout(name)
        sel: dict[str, list[int] | None] = {"B": batch, "H": heads, "T": None}
        if "T" in lay:
            sel["T"] = self._rel_positions(positions, t0, x.shape[lay.index("T")])
            if sel["T"] is not None and not sel["T"]:
                return lay, "empty"
        if "H" in lay and heads is not None:
            n = x.shape[lay.index("H")]
            bad = [h for h in heads if h >= n]
            if bad:
                raise BadIndex(f"head {bad[0]} is out of range for probe {name!r}, which has {n} heads (0–{n - 1})")
        if batch is not None:
            bad = [b for b in batch if b >= x.shape[0]]
            if bad:
                raise BadIndex(f"batch item {bad[0]} is out of range: the batch has {x.shape[0]} items")
        return lay, sel

    # ------------------------------------------------------------ points
    def point(self, name: str, x: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """Apply the edit of ``name`` to ``x`` and capture it; ``t0``: x's first step within this call."""
        edit = self.edits.get(name)
        if edit is not None:
            x = self.apply_edit(name, x, edit, t0)
        if name in self.capture:
            self.capture_value(name, x, t0)
        return x

    def apply_edit(self, name: str, x: torch.Tensor, edit: Edit, t0: int = 0) -> torch.Tensor:
        positions = None if edit.positions is None else as_index_list(edit.positions, None, "positions")
        heads = None if edit.heads is None else as_index_list(edit.heads, None, "heads")
        batch = None if edit.batch is None else as_index_list(edit.batch, None, "batch")
        lay, sel = self._selection(name, x, t0, positions, heads, batch)
        if sel == "empty":
            return x
        idx = _ix(lay, x.shape, sel, x.device)
        old = x if idx is None else x[idx]
        abs_pos = None
        if "T" in lay:
            rel = sel["T"] if sel["T"] is not None else list(range(x.shape[lay.index("T")]))
            abs_pos = [self.offset + t0 + r for r in rel]
        new = edit.new_values(name, old, sel.get("T"), abs_pos)
        if idx is None:
            return new.to(x.dtype)
        x = x.clone()
        x[idx] = new.to(x.dtype)
        return x

    def capture_value(self, name: str, x, t0: int = 0) -> None:
        if isinstance(x, dict):  # attention summaries: a dict of [B, Hq, T], positions recorded once
            for i, (k, v) in enumerate(x.items()):
                self._capture_tensor(name, v, t0, key=k, record_positions=i == 0)
            return
        self._capture_tensor(name, x, t0)

    def _capture_tensor(self, name: str, x: torch.Tensor, t0: int, key: str | None = None,
                        record_positions: bool = True) -> None:
        lay, sel = self._selection(name, x, t0, self.positions, self.heads, self.batch)
        store_name = name if key is None else f"{name}.{key}"
        if sel == "empty":
            return
        idx = _ix(lay, x.shape, sel, x.device)
        val = (x if idx is None else x[idx]).detach()
        dtype = self.dtype if val.is_floating_point() else None  # expert ids stay integers
        val = val.to(device=self.device or val.device, dtype=dtype or val.dtype, non_blocking=True)
        if idx is None or val.data_ptr() == x.data_ptr():
            val = val.clone()
        self.store[store_name].append(val)
        if "T" in lay and record_positions:
            n = x.shape[lay.index("T")]
            rel = sel["T"] if sel["T"] is not None else list(range(n))
            self.store_positions[name].extend(self.offset + t0 + r for r in rel)

    def store_direct(self, name: str, value: torch.Tensor, abs_positions: list[int]) -> None:
        """Store an already-selected value (e.g. attention rows computed only where asked)."""
        self.store[name].append(value.detach().to(device=self.device or value.device,
                                                  dtype=self.dtype or value.dtype))
        self.store_positions[name].extend(abs_positions)

    def probs_selection(self, name: str, t_len: int):
        """(heads, relative rows, absolute rows) to compute attention probabilities for, or None."""
        rows = self._rel_positions(self.positions, 0, t_len)
        if rows is not None and not rows:
            return None
        rel = rows if rows is not None else list(range(t_len))
        return self.heads, rel, [self.offset + r for r in rel]

    # ------------------------------------------------------------ states
    def state_record(self, layer: int) -> StateRecord:
        if layer not in self.states:
            self.states[layer] = StateRecord(chunk_size=self.chunk_size, heads=self.heads)
        return self.states[layer]

    def _narrow_heads(self, x: torch.Tensor, head_axis: int) -> torch.Tensor:
        if self.batch is not None:
            x = x.index_select(0, torch.as_tensor(self.batch, device=x.device))
        if self.heads is not None:
            x = x.index_select(head_axis, torch.as_tensor(self.heads, device=x.device))
        return x

    def _to_store(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(device=self.device or x.device, dtype=torch.float32, non_blocking=True).clone()

    def record_checkpoint(self, layer: int, position: int, state: torch.Tensor) -> None:
        """``state`` ``[B, HV, K, V]`` is the state before token ``position`` (absolute) is written."""
        self.state_record(layer).checkpoints[position] = self._to_store(self._narrow_heads(state, 1))

    def record_state_inputs(self, layer: int, **tensors: torch.Tensor) -> None:
        """Per-token replay inputs of this call: q, k ``[B, T, HV, K]``, v ``[B, T, HV, V]``, g, beta ``[B, T, HV]``."""
        rec = self.state_record(layer)
        for k, v in tensors.items():
            rec.inputs[k].append(self._to_store(self._narrow_heads(v, 2)))

    def record_final_state(self, layer: int, position: int, state: torch.Tensor) -> None:
        rec = self.state_record(layer)
        rec.final_position, rec.final = position, self._to_store(self._narrow_heads(state, 1))

    def needs_checkpoint(self, layer: int, position: int) -> bool:
        rec = self.states.get(layer)
        if rec is None or not rec.checkpoints:
            return True
        return position - max(p for p in rec.checkpoints if p <= position) >= self.chunk_size

    def state_edit_positions(self, layer: int) -> list[int] | None | str:
        """Relative positions in this call where the state of ``layer`` is edited; "all", or None."""
        edit = self.edits.get(f"layers.{layer}.deltanet.state")
        if edit is None:
            return None
        if edit.positions is None:
            return list(range(self.length))
        chosen = as_index_list(edit.positions, None, "positions")
        return [p - self.offset for p in chosen if self.offset <= p < self.offset + self.length]

    def edit_state(self, layer: int, rel_position: int, state: torch.Tensor) -> torch.Tensor:
        """Apply the state edit of ``layer`` to ``S_t`` ``[B, HV, K, V]`` at relative position ``rel_position``."""
        name = f"layers.{layer}.deltanet.state"
        edit = self.edits[name]
        heads = None if edit.heads is None else as_index_list(edit.heads, None, "heads")
        batch = None if edit.batch is None else as_index_list(edit.batch, None, "batch")
        lay, sel = "BH", {"B": batch, "H": heads}
        if heads is not None and max(heads) >= state.shape[1]:
            raise BadIndex(f"head {max(heads)} is out of range for {name!r}, which has {state.shape[1]} value heads")
        idx = _ix(lay, state.shape, sel, state.device)
        old = state if idx is None else state[idx]
        abs_pos = self.offset + rel_position
        if edit.donor is not None:
            donor_pos = abs_pos
            if edit.donor_positions is not None:
                positions = as_index_list(edit.positions, None, "positions")
                donor_pos = as_index_list(edit.donor_positions, None, "donor_positions")[positions.index(abs_pos)]
            new = edit.donor.state(layer, donor_pos).to(old)
            if idx is not None:
                new = new[idx]
        else:
            new = edit.new_values(name, old, [rel_position], [abs_pos])
        if idx is None:
            return new.to(state.dtype)
        state = state.clone()
        state[idx] = new.to(state.dtype)
        return state
