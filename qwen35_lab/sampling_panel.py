"""``SamplingPanel(lab)``: try the sampling parameters by hand and watch what each one does.

A preset menu fills six sliders (temperature, top_p, top_k, min_p, presence_penalty,
repetition_penalty) and the thinking switch; every change redraws the next-token distribution of
the prompt after each step of the sampler (raw → penalties → temperature → min_p → top_k →
top_p); Generate streams a reply into the panel::

    panel = SamplingPanel(lab, prompt="Name three colours.")
    panel                                   # in a notebook: the controls and the panel
    panel.preset.value = "qwen3.5-instruct-general"
    panel.current["stages"]["top_k"]        # {"kept": 20, "entropy": ..., "tokens": [...], "probs": [...]}
    panel.generate()                        # what the Generate button does; panel.output_text, panel.last_sample

A combination the sampler refuses (top_p = 0, repetition_penalty = 0, ...) shows its message in
the panel; nothing raises.
"""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import torch
from IPython import get_ipython
from IPython.display import display

from . import sampling
from .checks import BadType, BadValue, error_text

__all__ = ["SamplingPanel"]

_SLIDERS = {  # name: (widget class, min, max, step)
    "temperature": (W.FloatSlider, 0.0, 2.0, 0.05),
    "top_p": (W.FloatSlider, 0.0, 1.0, 0.01),
    "top_k": (W.IntSlider, -1, 100, 1),
    "min_p": (W.FloatSlider, 0.0, 1.0, 0.01),
    "presence_penalty": (W.FloatSlider, -2.0, 2.0, 0.1),
    "repetition_penalty": (W.FloatSlider, 0.0, 2.0, 0.05),
}
_CUSTOM = "custom"


class SamplingPanel:
    """Preset menu, six sliders, thinking switch, max tokens, seed, Generate; a live chart of the
    next-token distribution after each sampling step, and the streamed reply.

    State for code and tests: ``current`` (the parameters and, per stage, tokens kept, entropy
    and the top tokens' probabilities), ``message`` (an error shown in the panel, or ""),
    ``output_text`` (the reply as streamed so far), ``last_sample`` (a
    :class:`~qwen35_lab.sampling.Sample`); ``figure()`` draws the chart.
    """

    def __init__(self, lab, *, prompt: str = "Name three colours.", preset: str = "qwen3.5-instruct-general",
                 max_new_tokens: int = 32, seed: int = 0, top: int = 10):
        if not hasattr(lab, "model") or not hasattr(lab, "tokenizer"):
            raise BadType(f"SamplingPanel needs a Lab (from ql.load(...)), got {type(lab).__name__}")
        if not isinstance(prompt, str):
            raise BadType(f"prompt must be a str, got {type(prompt).__name__}")
        preset = sampling.get_preset(preset).name
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise BadValue(f"top must be a positive integer (how many tokens the chart shows), got {top!r}")
        self.lab = lab
        self.top = top
        self._logits_cache: dict = {}
        self._filling = False
        self._busy = False
        self.current: dict = {}
        self.message = ""
        self.output_text = ""
        self.last_sample = None

        self.prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="98%", height="60px"))
        self.preset = W.Dropdown(options=[_CUSTOM, *sampling.PRESETS], value=preset, description="preset",
                                 layout=W.Layout(width="420px"))
        self.sliders = {}
        for name, (cls, lo, hi, step) in _SLIDERS.items():
            s = cls(min=lo, max=hi, step=step, description=name, continuous_update=False,
                    style={"description_width": "130px"}, layout=W.Layout(width="420px"))
            s.add_class(f"qwen35-{name.replace('_', '-')}")
            self.sliders[name] = s
        self.thinking = W.Checkbox(value=False, description="thinking", indent=False,
                                   layout=W.Layout(width="100px"))
        small = {"style": {"description_width": "80px"}, "layout": W.Layout(width="210px")}
        self.max_new_tokens = W.BoundedIntText(value=max_new_tokens, min=1, max=4096, description="max tokens",
                                               **small)
        self.seed = W.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="seed", **small)
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play",
                                        layout=W.Layout(width="110px"))
        self.message_box = W.HTML()
        self.summary = W.HTML()
        self.summary.add_class("qwen35-sampling-summary")
        # the chart is a PNG in an Image widget, never an Output widget (whose display messages stalled
        # nbconvert runs): each redraw is one plain state update (see viz._png)
        self.chart = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto", display="none"))
        self.reply = W.HTML()
        self.reply.add_class("qwen35-sampling-output")
        controls = W.VBox([self.preset, *self.sliders.values(), W.HBox([self.thinking, self.max_new_tokens]),
                           W.HBox([self.seed, self.generate_button])], layout=W.Layout(flex="0 0 430px"))
        view = W.VBox([self.summary, self.chart], layout=W.Layout(flex="1 1 auto", min_width="480px"))
        self.widget = W.VBox([self.prompt, W.HBox([controls, view]), self.message_box, self.reply])

        self._fill_from_preset(preset)
        self.preset.observe(self._on_preset, names="value")
        for s in self.sliders.values():
            s.observe(self._on_param, names="value")
        self.thinking.observe(self._on_param, names="value")
        self.prompt.observe(self._on_param, names="value")
        self.generate_button.on_click(self._on_generate)
        self.refresh()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self):
        display(self.widget)

    # ------------------------------------------------------------------ values
    def values(self) -> dict:
        """The sampling arguments the controls hold now (not yet validated)."""
        v = {name: s.value for name, s in self.sliders.items()}
        v["enable_thinking"] = bool(self.thinking.value)
        return v

    def _fill_from_preset(self, name: str) -> None:
        if name == _CUSTOM:
            return
        p = sampling.get_preset(name)
        self._filling = True
        try:
            for key, s in self.sliders.items():
                s.value = getattr(p, key)
            self.thinking.value = p.enable_thinking
        finally:
            self._filling = False

    def _on_preset(self, change) -> None:
        self._fill_from_preset(change["new"])
        self.refresh()

    def _on_param(self, change) -> None:
        if self._filling:
            return
        owner = change.get("owner")
        if owner in self.sliders.values() and self.preset.value != _CUSTOM:
            preset = sampling.get_preset(self.preset.value)
            if getattr(preset, owner.description) != change["new"]:
                self._filling = True
                try:
                    self.preset.value = _CUSTOM  # the sliders no longer say what the preset says
                finally:
                    self._filling = False
        self.refresh()

    def _show_message(self, text: str) -> None:
        self.message = text
        self.message_box.value = (f"<pre style='color:#a00;white-space:pre-wrap'>{html.escape(text)}</pre>"
                                  if text else "")

    # ------------------------------------------------------------------ the distribution
    def _prompt_logits(self, enable_thinking: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [1, V], prompt_ids [1, T])`` of the next token after the prompt (cached)."""
        key = (self.prompt.value, enable_thinking)
        if key not in self._logits_cache:
            inputs = self.lab.prepare([{"role": "user", "content": self.prompt.value}],
                                      enable_thinking=enable_thinking)
            with torch.no_grad():
                logits = self.lab.model(**inputs).logits[:, -1].float().cpu()
            self._logits_cache = {key: (logits, inputs["input_ids"].cpu())}
        return self._logits_cache[key]

    def refresh(self) -> None:
        """Recompute ``current`` (each stage's distribution) and redraw, or show why not."""
        try:
            if not self.prompt.value.strip():
                raise BadValue("the prompt is empty; write a message for the model")
            params, enable_thinking, _ = sampling.resolve(self.values())
            logits, prompt_ids = self._prompt_logits(bool(enable_thinking))
            steps = sampling.stages(logits, params, prompt_ids=prompt_ids)
        except (ValueError, TypeError) as e:
            self._show_message(str(e))
            self.current = {"error": str(e)}
            self.summary.value = ""
            self._draw(None)
            return
        self._show_message("")
        order = steps["penalties"][0].topk(min(self.top, logits.shape[-1])).indices  # [top]
        tokens = [_label(t) for t in self.lab.tokenizer.convert_ids_to_tokens(order.tolist())]
        stages = {}
        for name, x in steps.items():
            probs = x[0].double().softmax(-1)
            stages[name] = {"kept": int(torch.isfinite(x[0]).sum()),
                            "entropy": float(torch.special.entr(probs).sum()),
                            "ids": order.tolist(), "tokens": tokens, "probs": probs[order].tolist()}
        self.current = {"params": params.as_dict(), "enable_thinking": enable_thinking, "stages": stages}
        final = stages["top_p"]
        best = int(np.argmax(final["probs"]))
        self.summary.value = html.escape(
            f"after all steps: {final['kept']} tokens kept, entropy {final['entropy']:.3f} nats, "
            f"most likely {tokens[best]!r} p={final['probs'][best]:.3f}")
        self._draw(stages)

    def figure(self):
        """The chart of ``current``: one bar chart per stage (None while the settings are invalid)."""
        stages = self.current.get("stages")
        return None if stages is None else _figure(stages)

    def _draw(self, stages) -> None:
        if get_ipython() is None:  # plain Python (scripts, tests): no PNG to draw
            return
        from .viz import _show_png

        _show_png(self.chart, None if stages is None else _figure(stages))

    # ------------------------------------------------------------------ generation
    def _on_generate(self, _button=None) -> None:
        self.generate()

    def generate(self):
        """Generate with the panel's settings, streaming into the panel; returns the Sample (or None)."""
        if self._busy:
            return None
        try:
            sampling.resolve(self.values())  # refuse bad settings before any work
            if not self.prompt.value.strip():
                raise BadValue("the prompt is empty; write a message for the model")
            if self.max_new_tokens.value < 1:
                raise BadValue(f"max tokens must be at least 1, got {self.max_new_tokens.value}")
        except (ValueError, TypeError) as e:
            self._show_message(str(e))
            return None
        self._show_message("")
        self._busy = True
        self.generate_button.disabled = True
        self.output_text = ""
        self._render_reply(streaming=True)
        try:
            s = sampling.sample(self.lab, self.prompt.value, max_new_tokens=int(self.max_new_tokens.value),
                                seed=int(self.seed.value), on_text=self._on_text, **self.values())
        except Exception as e:  # shown in the panel, never a traceback
            self._show_message(error_text(e))
            return None
        finally:
            self._busy = False
            self.generate_button.disabled = False
        self.last_sample = s
        self._render_reply(streaming=False)
        return s

    def _on_text(self, piece: str) -> None:
        self.output_text += piece
        self._render_reply(streaming=True)

    def _render_reply(self, *, streaming: bool) -> None:
        s = self.last_sample if not streaming else None
        parts = [f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(self.output_text)}</pre>"]
        if s is not None:
            m = s.metrics()
            state = "finished" if s.finished else "stopped at max tokens"
            if s.reasoning is not None and not s.finished_thinking:
                state += ", reasoning unfinished" + (" (looks like a thinking loop)" if m["thinking_loop"] else "")
            parts.append(f"<small>{len(s.ids)} tokens, {state}; distinct-2 {m['distinct_2']:.2f}, "
                         f"repetition {m['repetition_rate']:.2f}, mean entropy {s.entropy:.2f} nats</small>")
        self.reply.value = "".join(parts)


def _label(piece: str) -> str:
    """A token as text: bytes decoded, a leading space shown as ``␣`` (``" Blue"`` → ``"␣Blue"``)."""
    from .viz import _readable

    text = _readable(piece)
    return "␣" + text[1:] if text.startswith(" ") and text.strip() else text


def _figure(stages: dict):
    """One bar chart per stage: probabilities of the same top tokens after each step."""
    from .viz import _new_figure, _plain_numbers, _short, _token_fonts

    names = list(stages)
    fig = _new_figure((9.0, 5.6))
    axes = fig.subplots(2, 3).ravel()  # each stage on its own scale: raw probabilities can be tiny
    for ax, name in zip(axes, names):
        st = stages[name]
        ax.bar(range(len(st["probs"])), st["probs"], color="#4c72b0" if name != "top_p" else "#dd8452")
        ax.set_xticks(range(len(st["tokens"])), [_short(t, 16) for t in st["tokens"]], rotation=90, fontsize=8,
                      fontfamily=_token_fonts())  # fallback across the installed fonts
        _plain_numbers(ax, "y")  # plain tick numbers: no '1e−6' offset text over the title
        ax.set_title(f"{name}: {st['kept']} kept, H={st['entropy']:.2f}", fontsize=9)
    axes[0].set_ylabel("probability", fontsize=8)
    axes[3].set_ylabel("probability", fontsize=8)
    return fig
