"""Layer picker: which module types, in which blocks, may receive trainable rows.

The choice is a product, module types × block indices, which is what
``rowsft.select(..., module_types=..., layers=...)`` takes. Shortcut buttons pick "all attention",
"all MLP", everything or nothing. Which types are attention or MLP comes from the model's coupled
neuron groups (``targets.neuron_groups``) when a model is given, else from the usual names
(``q_proj``, ``query``, ``c_attn``, ``self_attn`` ... are attention). GPT-2's two ``c_proj`` layers
have distinct types (``attn.c_proj``, ``mlp.c_proj``; see ``targets.module_type``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import ipywidgets as widgets

from rowsft.notebook._widgets import Displayable, StatusArea
from rowsft.targets import find_targets, layer_index, module_type, neuron_groups

ATTENTION_WORDS = ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv")


def guess_kind(name: str) -> str:
    """``"attention"`` or ``"mlp"`` from a module (or group) name alone."""
    parts = name.lower().split(".")
    return "attention" if any(w in p for p in parts for w in ATTENTION_WORDS) else "mlp"


class LayerPicker(Displayable):
    """Check boxes for module types, toggle buttons for blocks, and family shortcuts.

    ``names``: the module (or neuron-group) names that can be picked, e.g. ``list(scores)``.
    ``kinds``: optional ``{name: "attention" | "mlp"}``; guessed from the names when missing.
    ``type_of``: name → the type ``select(module_types=...)`` matches (default
    ``targets.module_type``; for group scores pass ``scores.layer_type``, which gives the group kind).
    Read the choice from :attr:`module_types`, :attr:`layers` and :attr:`names`; get told of
    changes with :meth:`observe`.
    """

    def __init__(self, names: Iterable[str], kinds: dict[str, str] | None = None,
                 type_of: Callable[[str], str] | None = None):
        self.all_names = list(dict.fromkeys(names))
        self.type_of = type_of or module_type
        if not self.all_names:
            raise ValueError("the layer picker needs at least one layer name (score the model first)")
        kinds = kinds or {}
        self.type_kinds: dict[str, set[str]] = {}
        for n in self.all_names:
            self.type_kinds.setdefault(self.type_of(n), set()).add(kinds.get(n) or guess_kind(n))
        blocks = sorted({i for i in map(layer_index, self.all_names) if i is not None})
        self._callbacks: list[Callable] = []
        self._muted = False
        self.type_boxes = {t: widgets.Checkbox(value=True, description=t, indent=False,
                                               layout=widgets.Layout(width="auto", margin="0 12px 0 0"))
                           for t in self.type_kinds}
        self.block_buttons = {b: widgets.ToggleButton(value=True, description=str(b), tooltip=f"block {b}",
                                                      layout=widgets.Layout(width="38px", height="26px", padding="0"))
                              for b in blocks}
        self.all_attention = widgets.Button(description="all attention", layout=widgets.Layout(width="auto"))
        self.all_mlp = widgets.Button(description="all MLP", layout=widgets.Layout(width="auto"))
        self.all_button = widgets.Button(description="everything", layout=widgets.Layout(width="auto"))
        self.none_button = widgets.Button(description="nothing", layout=widgets.Layout(width="auto"))
        self.status = StatusArea()
        self.all_attention.on_click(lambda _: self.pick_family("attention"))
        self.all_mlp.on_click(lambda _: self.pick_family("mlp"))
        self.all_button.on_click(lambda _: self.pick(types=list(self.type_boxes), blocks=list(self.block_buttons)))
        self.none_button.on_click(lambda _: self.pick(types=[], blocks=[]))
        for w in [*self.type_boxes.values(), *self.block_buttons.values()]:
            w.observe(self._changed, names="value")
        self.widget = widgets.VBox([
            widgets.HBox([widgets.Label("module types:"), *self.type_boxes.values()],
                         layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([widgets.Label("blocks:"), *self.block_buttons.values()],
                         layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.all_attention, self.all_mlp, self.all_button, self.none_button]),
            self.status])
        self._report()

    @classmethod
    def from_model(cls, model, targets="all-linear") -> "LayerPicker":
        """A picker over the target modules of ``model``, families taken from its neuron groups."""
        names = list(find_targets(model, targets))
        kinds = {m.module: g.kind for g in neuron_groups(model) for m in g.members}
        return cls(names, kinds)

    # ------------------------------------------------------------------ the choice
    @property
    def module_types(self) -> list[str]:
        return [t for t, box in self.type_boxes.items() if box.value]

    @property
    def layers(self) -> list[int]:
        return [b for b, button in self.block_buttons.items() if button.value]

    @property
    def names(self) -> list[str]:
        """The picked names: a picked type in a picked block (names outside any block follow their type)."""
        types, blocks = set(self.module_types), set(self.layers)
        return [n for n in self.all_names
                if self.type_of(n) in types and (layer_index(n) is None or layer_index(n) in blocks)]

    @property
    def everything(self) -> bool:
        return all(b.value for b in self.type_boxes.values()) and all(b.value for b in self.block_buttons.values())

    def select_kwargs(self) -> dict:
        """``module_types``/``layers`` for ``rowsft.select`` (``None`` for "no restriction")."""
        return {"module_types": None if all(b.value for b in self.type_boxes.values()) else self.module_types,
                "layers": None if all(b.value for b in self.block_buttons.values()) else self.layers}

    # ------------------------------------------------------------------ changing it
    def pick(self, types: Iterable[str] | None = None, blocks: Iterable[int] | None = None) -> None:
        """Set the picked types and/or blocks (one change notification)."""
        if types is not None:
            types = set(types)
            unknown = types - set(self.type_boxes)
            if unknown:
                self.status.error(f"unknown module type(s) {sorted(unknown)}; types here: {list(self.type_boxes)}")
                return
        self._muted = True
        try:
            if types is not None:
                for t, box in self.type_boxes.items():
                    box.value = t in types
            if blocks is not None:
                blocks = set(blocks)
                for b, button in self.block_buttons.items():
                    button.value = b in blocks
        finally:
            self._muted = False
        self._changed()

    def pick_family(self, kind: str) -> None:
        """Every type of one family (``"attention"`` or ``"mlp"``); all blocks if none was picked."""
        types = [t for t, kinds in self.type_kinds.items() if kind in kinds]
        if not types:
            self.status.error(f"this model has no {kind} layers among {list(self.type_boxes)}")
            return
        self.pick(types=types, blocks=None if self.layers else list(self.block_buttons))

    def observe(self, callback: Callable[["LayerPicker"], None]) -> None:
        """Call ``callback(picker)`` after every change of the choice."""
        self._callbacks.append(callback)

    def _changed(self, _change=None) -> None:
        if self._muted:
            return
        self._report()
        for cb in self._callbacks:
            cb(self)

    def _report(self) -> None:
        picked = self.names
        if picked:
            self.status.info(f"{len(picked)} of {len(self.all_names)} layers picked")
        else:
            self.status.error("no layer picked: tick at least one module type and one block")
