"""Interventions: replace, scale or zero a probe, or patch it from another trace.

``edits={"layers.3.deltanet.beta": 0.0}`` replaces β by 0 everywhere;
``edits={"layers.3.deltanet.beta": ql.scale(2.0, heads=[1])}`` doubles head 1;
a tensor replaces (broadcast to the selection), a function maps the selected
values to new ones, and :func:`patch` takes the values from another trace
(activation patching across prompts). ``positions`` are absolute token
positions (prompt and generated tokens alike).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from ..checks import BadType, BadValue, check_finite, check_float, check_indices, check_str

__all__ = ["Edit", "replace", "scale", "zero", "patch", "as_edit"]


@dataclass
class Edit:
    """One intervention on one probe. Exactly one of ``value``, ``factor``, ``fn``, ``donor`` is used."""

    value: float | torch.Tensor | None = None
    factor: float | None = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    donor: object | None = None  # a Trace
    donor_name: str | None = None
    donor_positions: list[int] | None = None
    positions: object = None
    heads: object = None
    batch: object = None

    def describe(self) -> str:
        if self.factor is not None:
            return f"scale ×{self.factor}"
        if self.fn is not None:
            return f"function {getattr(self.fn, '__name__', 'fn')}"
        if self.donor is not None:
            return "patch from another trace"
        if torch.is_tensor(self.value):
            return f"replace with tensor {tuple(self.value.shape)}"
        return f"replace with {self.value}"

    def new_values(self, name: str, old: torch.Tensor, rel_positions: list[int] | None,
                   abs_positions: list[int] | None) -> torch.Tensor:
        """The values that replace ``old`` (the selected slice of probe ``name``)."""
        if self.factor is not None:
            return old * self.factor
        if self.fn is not None:
            new = self.fn(old)
            if not torch.is_tensor(new) or new.shape != old.shape:
                got = tuple(new.shape) if torch.is_tensor(new) else type(new).__name__
                raise BadValue(f"the edit function for {name!r} must return a tensor of shape "
                                 f"{tuple(old.shape)} (the selected values); it returned {got}")
            return new.to(old.dtype)
        if self.donor is not None:
            return self._donor_values(name, old, abs_positions)
        if torch.is_tensor(self.value):
            v = self.value.to(device=old.device, dtype=old.dtype)
            try:
                return torch.broadcast_to(v, old.shape).clone()
            except RuntimeError:
                raise BadValue(f"edit tensor of shape {tuple(v.shape)} does not fit probe {name!r}: the selected "
                                 f"values have shape {tuple(old.shape)}") from None
        return torch.full_like(old, float(self.value))

    def _donor_values(self, name: str, old: torch.Tensor, abs_positions: list[int] | None) -> torch.Tensor:
        from .probes import layout, parse

        trace = self.donor
        src_name = self.donor_name or name
        layer, kind = parse(src_name)
        if kind == "deltanet.state":
            if abs_positions is None:
                raise BadValue(f"patching {name!r} from a trace needs positions=[...]")
            src_pos = self.donor_positions or abs_positions
            states = [trace.state(layer, p) for p in src_pos]  # each [B, HV, K, V]
            v = torch.stack(states, 0)  # [P, B, HV, K, V]; the edit applies one position at a time
            return v[: old.shape[0]].to(old) if v.shape[0] > 1 else v[0].to(old)
        full = trace[src_name]
        lay = layout(src_name)
        if "T" in lay and abs_positions is not None:
            src_pos = self.donor_positions or abs_positions
            t_axis = lay.index("T")
            index = trace.position_index(src_name, src_pos)
            full = full.index_select(t_axis, index.to(full.device))
        try:
            return torch.broadcast_to(full.to(device=old.device, dtype=old.dtype), old.shape).clone()
        except RuntimeError:
            raise BadValue(f"cannot patch {name!r}: the donor's {src_name!r} selection has shape "
                             f"{tuple(full.shape)}, the edited selection {tuple(old.shape)}") from None


def replace(value, *, positions=None, heads=None, batch=None) -> Edit:
    """Replace the selected values by a number or a tensor (broadcast)."""
    if torch.is_tensor(value):
        check_finite("replace value", value)
    else:
        value = check_float("replace value", value)
    return Edit(value=value, positions=positions, heads=heads, batch=batch)


def scale(factor: float, *, positions=None, heads=None, batch=None) -> Edit:
    """Multiply the selected values by ``factor`` (``scale(1.0)`` changes nothing)."""
    return Edit(factor=check_float("scale factor", factor), positions=positions, heads=heads, batch=batch)


def zero(*, positions=None, heads=None, batch=None) -> Edit:
    return Edit(value=0.0, positions=positions, heads=heads, batch=batch)


def patch(trace, name: str | None = None, *, positions=None, donor_positions=None, heads=None, batch=None) -> Edit:
    """Take the values from ``trace`` (same probe, or ``name``) at ``donor_positions`` (default: the same)."""
    if name is not None:
        check_str("name", name)
    positions = check_indices("positions", positions, None) if not isinstance(positions, slice) else positions
    donor_positions = check_indices("donor_positions", donor_positions, None)
    return Edit(donor=trace, donor_name=name, positions=positions, donor_positions=donor_positions,
                heads=heads, batch=batch)


def as_edit(name: str, spec) -> Edit:
    if isinstance(spec, Edit):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Edit(value=float(spec))
    if torch.is_tensor(spec):
        return Edit(value=spec)
    if callable(spec):
        return Edit(fn=spec)
    raise BadType(f"edit for {name!r} must be a number, a tensor, a function or an Edit "
                    f"(ql.replace / ql.scale / ql.zero / ql.patch); got {type(spec).__name__}")
