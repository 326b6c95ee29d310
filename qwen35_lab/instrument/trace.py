"""``Trace``: what one run captured, by probe name; DeltaNet states served by replay.

``tr["layers.3.deltanet.beta"]`` is ``[B, T, HV]``; ``tr.state(3, t)`` is
``S_t`` rebuilt from the nearest chunk checkpoint plus at most one chunk of
steps; ``tr.effective_attention(3, heads, rows)`` is the exact token-to-token
mixing matrix of a DeltaNet layer. ``tr.save(path)`` writes a directory with
``trace.safetensors`` and ``trace.json`` atomically; ``Trace.load(path)``
reads it back (a truncated or corrupt file is refused with a clear error).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import ops
from .._io import atomic_directory
from ..checkpoint_files import check_safetensors
from ..checks import (BadIndex, BadType, BadValue, MissingFile, NotCaptured, OverBudget, check_int, check_path,
                      check_writable_target)
from . import memory as _memory
from .probes import layout, parse

__all__ = ["Trace"]

FORMAT_VERSION = 1


class Trace:
    """Captured values of one run, keyed by probe name (see :mod:`qwen35_lab.instrument.probes`)."""

    def __init__(self, tensors=None, positions=None, states=None, meta=None, chunk_size: int = 64):
        self._tensors: dict[str, torch.Tensor] = tensors or {}
        self._positions: dict[str, list[int]] = positions or {}
        # layer -> {"checkpoints": {pos: S}, "final": (pos, S), "inputs": {q,k,v,g,beta}}
        self._states: dict[int, dict] = states or {}
        self.meta: dict = meta or {}
        self.chunk_size = chunk_size
        self._recording = False

    # ------------------------------------------------------------ building
    @classmethod
    def from_session(cls, session, meta: dict) -> Trace:
        tensors: dict[str, torch.Tensor] = {}
        positions: dict[str, list[int]] = {}
        for name, parts in session.store.items():
            base = name if name in session.capture else name.rsplit(".", 1)[0]
            tensors[name] = _concat(base, parts)
        for name, pos in session.store_positions.items():
            positions[name] = list(pos)
        states = {}
        for layer, rec in session.states.items():
            states[layer] = {"checkpoints": dict(rec.checkpoints), "final": (rec.final_position, rec.final),
                             "inputs": rec.finalize(), "heads": rec.heads}
        # which heads / batch items the probes hold (None = all), and which paths ran
        meta = {**meta, "heads": session.heads, "batch": session.batch,
                "ran_instrumented": sorted(session.ran_instrumented)}
        return cls(tensors, positions, states, meta, session.chunk_size)

    # ------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        """Captured probe names (summary parts grouped under ``layers.i.attn.summary``)."""
        out = []
        for n in self._tensors:
            base = n.rsplit(".", 1)[0] if ".summary." in n else n
            if base not in out:
                out.append(base)
        out += [f"layers.{i}.deltanet.state" for i in sorted(self._states)]
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str):
        if not isinstance(name, str):
            raise BadType(f"a trace is indexed by probe name (str), e.g. trace['layers.0.deltanet.beta']; got {name!r}")
        if name in self._tensors:
            return self._tensors[name]
        if name.endswith(".summary") and any(k.startswith(name + ".") for k in self._tensors):
            return {k[len(name) + 1:]: v for k, v in self._tensors.items() if k.startswith(name + ".")}
        layer, kind = parse(name)
        if kind == "deltanet.state" and layer in self._states:
            raise NotCaptured(f"{name!r} is stored as checkpoints: use trace.state({layer}, t) for S_t, "
                           f"or trace.states({layer}) for every position")
        raise NotCaptured(f"{name!r} was not captured; captured: {', '.join(self.names) or 'nothing'}")

    def positions(self, name: str) -> list[int]:
        """Absolute token positions along the T axis of a captured probe."""
        if name not in self._positions:
            raise NotCaptured(f"{name!r} has no position axis or was not captured")
        return self._positions[name]

    def position_index(self, name: str, absolute: list[int]) -> torch.Tensor:
        """Indices along ``name``'s T axis of the absolute positions ``absolute``."""
        have = self.positions(name)
        lookup = {p: i for i, p in enumerate(have)}
        missing = [p for p in absolute if p not in lookup]
        if missing:
            raise BadIndex(f"position {missing[0]} was not captured for {name!r}; captured positions: "
                             f"{_ranges(have)}")
        return torch.tensor([lookup[p] for p in absolute])

    @property
    def tokens(self) -> torch.Tensor | None:
        """Token ids ``[B, T]`` of the whole sequence (prompt and generated)."""
        return self.meta.get("tokens")

    @property
    def token_strings(self) -> list[str]:
        return self.meta.get("token_strings", [])

    @property
    def position_ids(self) -> torch.Tensor | None:
        """M-RoPE position ids ``[3, B, T]`` (t, h, w) of the prompt, when the model uses them."""
        return self.meta.get("position_ids")

    @property
    def length(self) -> int:
        t = self.tokens
        return int(t.shape[1]) if t is not None else 0

    # ------------------------------------------------------------- states
    def _state_layer(self, layer: int) -> dict:
        check_int("layer", layer)
        if layer not in self._states:
            have = sorted(self._states)
            raise NotCaptured(f"the DeltaNet state of layer {layer} was not captured (add "
                           f"'layers.{layer}.deltanet.state' to capture); captured state layers: {have or 'none'}")
        return self._states[layer]

    def state(self, layer: int, t: int) -> torch.Tensor:
        """``S_t`` ``[B, HV, K, V]``: the state after token ``t`` was written (fp32).

        Rebuilt from the nearest checkpoint at or before ``t + 1`` plus at most
        one chunk of recurrence steps.
        """
        rec = self._state_layer(layer)
        final_pos, final = rec["final"]
        check_int("t", t)
        if not 0 <= t < final_pos:
            raise BadIndex(f"position {t!r} is out of range for layer {layer}'s state: valid 0–{final_pos - 1}")
        target = t + 1  # S_t is the state before token t + 1
        if target == final_pos:
            return final.clone()
        start = max(p for p in rec["checkpoints"] if p <= target)
        S = rec["checkpoints"][start]
        if start == target:
            return S.clone()
        x = rec["inputs"]
        seg = slice(start, target)
        _, S_t, _ = ops.chunk_gated_delta_rule(x["q"][:, seg], x["k"][:, seg], x["v"][:, seg], x["g"][:, seg],
                                               x["beta"][:, seg], initial_state=S, output_final_state=True,
                                               use_qk_l2norm=False, chunk_size=self.chunk_size)
        return S_t

    def states(self, layer: int, positions=None, *, budget_bytes: int | None = None) -> torch.Tensor:
        """``S_t`` for many positions ``[B, P, HV, K, V]`` (all by default), within a memory budget."""
        rec = self._state_layer(layer)
        final_pos, final = rec["final"]
        positions = list(range(final_pos)) if positions is None else list(positions)
        need = len(positions) * final.numel() * 4
        budget = budget_bytes if budget_bytes is not None else _default_budget()
        if need > budget:
            raise OverBudget(f"{len(positions)} states of layer {layer} need {need / 1e9:.2f} GB, over the budget of "
                              f"{budget / 1e9:.2f} GB; ask for fewer positions (trace.states({layer}, positions=...)) "
                              "or use trace.state(layer, t) one at a time")
        return torch.stack([self.state(layer, t) for t in positions], dim=1)

    def state_length(self, layer: int) -> int:
        """How many positions have a state ``S_t`` (a generated last token is never fed back)."""
        return self._state_layer(layer)["final"][0]

    def final_state(self, layer: int) -> torch.Tensor:
        return self._state_layer(layer)["final"][1].clone()

    def checkpoint_positions(self, layer: int) -> list[int]:
        return sorted(self._state_layer(layer)["checkpoints"])

    def effective_attention(self, layer: int, heads=None, rows=None) -> torch.Tensor:
        """Exact DeltaNet mixing ``A [B, h, r, T]`` with ``o_t = Σ_s A[t, s] v_s`` (zero initial state).

        ``heads`` index the captured value heads; ``rows`` are query positions.
        """
        x = self._state_layer(layer)["inputs"]
        return ops.deltanet_effective_attention(x["q"], x["k"], x["g"], x["beta"], heads=heads, rows=rows,
                                                use_qk_l2norm=False, chunk_size=self.chunk_size)

    def state_inputs(self, layer: int) -> dict[str, torch.Tensor]:
        """q, k (normalised, per value head), v, g, beta of a layer whose state was captured."""
        return dict(self._state_layer(layer)["inputs"])

    # -------------------------------------------------------------- memory
    def read_memory(self, layer: int, t: int, key, *, heads=None, lab=None, kind: str = "k") -> torch.Tensor:
        """``S_tᵀ k̂`` ``[B, h, V]``: what DeltaNet ``layer`` returns for ``key`` after token ``t``.

        ``key``: a vector, a position of this trace, ``key_from(other_trace, position)`` or a token
        (a string, with ``lab=``). See :func:`qwen35_lab.instrument.memory.read_memory`.
        """
        return _memory.read_memory(self, layer, t, key, heads=heads, lab=lab, kind=kind)

    def nearest_values(self, layer: int, read: torch.Tensor, *, heads=None, positions=None, top: int = 5,
                       batch: int = 0) -> list[list[dict]]:
        """The value tokens whose written vectors ``v_p`` are nearest (cosine) to ``read``, per head."""
        return _memory.nearest_values(self, layer, read, heads=heads, positions=positions, top=top, batch=batch)

    def state_contributions(self, layer: int, t: int, *, heads=None, matrices=None, since: int = 0):
        """Exact ``S_t = carried + Σ_s C_s``: what each token ``s ≤ t`` still contributes to the state
        (per-token norms, what decay and later writes removed; full ``C_s`` for ``matrices``).
        See :class:`qwen35_lab.instrument.memory.StateContributions`."""
        return _memory.state_contributions(self, layer, t, heads=heads, matrices=matrices, since=since)

    # ---------------------------------------------------------- segments
    def segment_slice(self, index: int) -> slice:
        """Token slice of input segment ``index`` (see ``meta["segments"]``)."""
        segs = self.meta.get("segments") or []
        if not (0 <= index < len(segs)):
            raise BadIndex(f"segment {index} out of range: the trace has {len(segs)} segments")
        return slice(segs[index]["start"], segs[index]["end"])

    # ------------------------------------------------------------- saving
    def save(self, path: str | Path) -> Path:
        """Write ``path/trace.safetensors`` and ``path/trace.json`` (atomically: all or nothing)."""
        from safetensors.torch import save_file

        flat: dict[str, torch.Tensor] = {}
        for name, t in self._tensors.items():
            flat[f"probe/{name}"] = t.contiguous().cpu()
        states_meta = {}
        for layer, rec in self._states.items():
            for pos, S in rec["checkpoints"].items():
                flat[f"state/{layer}/ckpt/{pos}"] = S.contiguous().cpu()
            fpos, fS = rec["final"]
            flat[f"state/{layer}/final"] = fS.contiguous().cpu()
            for k, v in rec["inputs"].items():
                flat[f"state/{layer}/input/{k}"] = v.contiguous().cpu()
            states_meta[str(layer)] = {"final_position": fpos, "checkpoints": sorted(rec["checkpoints"]),
                                       "heads": rec.get("heads")}
        meta_json = {}
        for k, v in self.meta.items():
            if torch.is_tensor(v):
                flat[f"meta/{k}"] = v.contiguous().cpu()
            else:
                meta_json[k] = v
        doc = {"format": "qwen35_lab.trace", "version": FORMAT_VERSION, "chunk_size": self.chunk_size,
               "positions": self._positions, "states": states_meta, "meta": meta_json,
               "tensors": sorted(flat)}
        path = check_writable_target("path", path, directory=True)
        with atomic_directory(path) as tmp:
            save_file(flat, str(tmp / "trace.safetensors"))
            (tmp / "trace.json").write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """A trace written by :meth:`save`; a file of another format version, a document with missing
        or mistyped fields, or tensors it lists but does not hold are refused by name."""
        from safetensors.torch import load_file

        path = check_path("path", path)
        if not path.is_dir():
            raise MissingFile(f"no trace directory {str(path)!r} (Trace.save writes a directory)")
        jf, tf = path / "trace.json", path / "trace.safetensors"
        for f in (jf, tf):
            if not f.is_file():
                raise MissingFile(f"{str(path)!r} is not a complete trace: {f.name} is missing")
        try:
            doc = json.loads(jf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadValue(f"corrupt trace {str(path)!r}: trace.json is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != "qwen35_lab.trace":
            raise BadValue(f"{str(jf)!r} is not a qwen35_lab trace (no \"format\": \"qwen35_lab.trace\")")
        if doc.get("version") != FORMAT_VERSION:
            raise BadValue(f"{str(jf)!r} is a trace of format version {doc.get('version')!r}; this qwen35_lab reads "
                           f"version {FORMAT_VERSION} — load it with the qwen35_lab that wrote it")
        _check_doc(jf, doc)
        check_safetensors(tf)
        flat = load_file(str(tf))
        missing = set(doc["tensors"]) - set(flat)
        needed = {f"state/{layer}/ckpt/{p}" for layer, sm in doc["states"].items() for p in sm["checkpoints"]}
        needed |= {f"state/{layer}/final" for layer in doc["states"]}
        missing |= needed - set(flat)
        if missing:
            raise BadValue(f"corrupt trace {str(path)!r}: trace.json lists tensors that trace.safetensors does not "
                           f"hold: {sorted(missing)[:3]}{' …' if len(missing) > 3 else ''}")
        tensors = {k[len("probe/"):]: v for k, v in flat.items() if k.startswith("probe/")}
        meta = dict(doc["meta"])
        meta.update({k[len("meta/"):]: v for k, v in flat.items() if k.startswith("meta/")})
        states = {}
        for layer_s, sm in doc["states"].items():
            layer = int(layer_s)
            states[layer] = {
                "checkpoints": {p: flat[f"state/{layer}/ckpt/{p}"] for p in sm["checkpoints"]},
                "final": (sm["final_position"], flat[f"state/{layer}/final"]),
                "inputs": {k.rsplit("/", 1)[-1]: v for k, v in flat.items() if k.startswith(f"state/{layer}/input/")},
                "heads": sm.get("heads"),
            }
        positions = {k: list(v) for k, v in doc["positions"].items()}
        return cls(tensors, positions, states, meta, doc["chunk_size"])

    # ------------------------------------------------------------ display
    def __repr__(self) -> str:
        lines = [f"Trace({self.meta.get('model', '?')}, {self.length} tokens, {len(self.names)} probes)"]
        for name in self.names[:40]:
            layer, kind = parse(name)
            if kind == "deltanet.state":
                rec = self._states[layer]
                S = rec["final"][1]
                lines.append(f"  {name:<34} checkpoints at {rec['checkpoints'] and sorted(rec['checkpoints'])[:6]}"
                             f"{'…' if len(rec['checkpoints']) > 6 else ''}, S {list(S.shape)}")
            else:
                v = self[name]
                shape = {k: list(x.shape) for k, x in v.items()} if isinstance(v, dict) else list(v.shape)
                lines.append(f"  {name:<34} {shape}")
        if len(self.names) > 40:
            lines.append(f"  … {len(self.names) - 40} more")
        return "\n".join(lines)


def _check_doc(jf: Path, doc: dict) -> None:
    """Every field ``load`` reads, with its type, before any tensor is read."""
    def bad(field: str, want: str):
        return BadValue(f"corrupt trace {str(jf)!r}: field {field!r} should be {want}, got {doc.get(field)!r}"[:400])

    for field, kind, want in (("chunk_size", int, "a positive int"), ("positions", dict, "an object"),
                              ("states", dict, "an object"), ("meta", dict, "an object"),
                              ("tensors", list, "a list of names")):
        if not isinstance(doc.get(field), kind) or isinstance(doc.get(field), bool):
            raise bad(field, want)
    if doc["chunk_size"] < 1 or not all(isinstance(t, str) for t in doc["tensors"]):
        raise bad("chunk_size" if doc["chunk_size"] < 1 else "tensors", "a positive int / a list of names")
    for layer, sm in doc["states"].items():
        ok = (layer.isdigit() and isinstance(sm, dict) and isinstance(sm.get("final_position"), int)
              and isinstance(sm.get("checkpoints"), list) and all(isinstance(c, int) for c in sm["checkpoints"]))
        if not ok:
            raise bad("states", "{layer: {'final_position': int, 'checkpoints': [ints]}}")
    if not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in doc["positions"].values()):
        raise bad("positions", "{probe name: [ints]}")


def _concat(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if name.startswith("visual."):  # images and videos go through the vision tower in separate calls
        return torch.cat(parts, dim=0)
    lay = layout(name) if not name.endswith(("entropy", "max_prob", "sink_mass", "mean_distance")) else "BHT"
    if "T" not in lay:
        return parts[-1]  # e.g. conv_state: the latest
    axis = lay.index("T")
    if parse(name)[1] == "attn.probs":  # rows of growing key length: right-pad with zeros
        tk = max(p.shape[-1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, tk - p.shape[-1])) for p in parts]
    return torch.cat(parts, dim=axis)


def _ranges(pos: list[int]) -> str:
    if not pos:
        return "none"
    out, start, prev = [], pos[0], pos[0]
    for p in pos[1:] + [None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        out.append(f"{start}–{prev}" if prev != start else f"{start}")
        if p is not None:
            start = prev = p
    return ", ".join(out)


def _default_budget() -> int:
    import psutil

    return int(0.5 * psutil.virtual_memory().available)
