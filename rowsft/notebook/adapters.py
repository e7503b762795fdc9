"""The dashboard's folded "Adapters" section: :class:`AdaptersPanel`, the widgets around kept adapters.

Keep the model's trained update under a name, Use a kept one or None, Compare two on the same questions.
The logic needs no widgets and lives in :mod:`rowsft.notebook.kept_adapters` (:class:`KeptAdapter`,
:func:`keep_adapter`, :func:`use_adapter`, :func:`use_none`, :func:`compare_adapters`,
:func:`comparison_text`); those names are re-exported here, so ``from rowsft.notebook.adapters import ...``
keeps working.
"""
from __future__ import annotations

import html
import threading
from typing import Callable

import ipywidgets as widgets

from rowsft.notebook._widgets import Displayable, StatusArea, error_message, log
from rowsft.notebook.kept_adapters import (
    UNKEPT,
    KeptAdapter,
    _check_frozen,
    carries,
    compare_adapters,
    comparison_text,
    frozen_versions,
    has_update,
    keep_adapter,
    unkept,
    use_adapter,
    use_none,
)

__all__ = ["UNKEPT", "AdaptersPanel", "KeptAdapter", "carries", "compare_adapters", "comparison_text",
           "frozen_versions", "has_update", "keep_adapter", "unkept", "use_adapter", "use_none"]


# ---------------------------------------------------------------- the widgets
class AdaptersPanel(Displayable):
    """Keep the model's trained update under a name, Use a kept one or None, Compare two (see the module help).

    ``eval_fn(model)``: the evaluation Compare uses (``rowsft.evaluate``-style results; None: Compare is
    refused). ``busy_fn()``: why the model must not change now (a run training), or None.
    ``background=False`` compares in the caller's thread.
    """

    def __init__(self, model, eval_fn: Callable | None = None, busy_fn: Callable[[], str | None] | None = None,
                 background: bool = True):
        self.model, self.eval_fn, self.busy_fn, self.background = model, eval_fn, busy_fn, background
        self.adapters: dict[str, KeptAdapter] = {}
        self.comparison: dict | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._drop_armed = False
        self.name = widgets.Text(value="", placeholder="a name, e.g. taylor rows", description="name",
                                 layout=widgets.Layout(width="260px"))
        self.keep_button = widgets.Button(description="Keep as adapter…", icon="save")
        self.choice = widgets.Dropdown(options=[], description="adapter", layout=widgets.Layout(width="260px"))
        self.use_button = widgets.Button(description="Use", button_style="info", icon="check")
        self.none_button = widgets.Button(description="None", icon="ban")
        self.first = widgets.Dropdown(options=[], description="A", layout=widgets.Layout(width="220px"))
        self.second = widgets.Dropdown(options=[], description="B", layout=widgets.Layout(width="220px"))
        self.compare_button = widgets.Button(description="Compare A vs B", button_style="primary", icon="balance-scale")
        self.status = StatusArea()
        self.result = widgets.HTML("")
        self.keep_button.on_click(lambda _: self.keep())
        self.use_button.on_click(lambda _: self.use())
        self.none_button.on_click(lambda _: self.none())
        self.compare_button.on_click(lambda _: self.compare())
        about = widgets.HTML("<i>keep the trained update under a name, train another one (a new selection starts "
                             "from the pretrained model; press None first to restart the same one), switch between "
                             "them, and compare two on the same held-out questions</i>")
        self.widget = widgets.VBox([about, widgets.HBox([self.name, self.keep_button]),
                                    widgets.HBox([self.choice, self.use_button, self.none_button]),
                                    widgets.HBox([self.first, self.second, self.compare_button]),
                                    self.status, self.result])

    @property
    def running(self) -> bool:
        """True while a comparison evaluates (it switches the model's update)."""
        return self._thread is not None and self._thread.is_alive()

    def _refused(self, what: str) -> str | None:
        if self.running:
            return f"Cannot {what} now: a comparison is running; wait for it to end"
        reason = self.busy_fn() if self.busy_fn is not None else None
        return f"Cannot {what} now: {reason}" if reason else None

    def _refuse(self, message: str) -> bool:
        self.status.error(message)
        return False

    def _refresh_choices(self, chosen: str | None = None) -> None:
        names = list(self.adapters)
        keep_first, keep_second = self.first.value, self.second.value
        self.choice.options = self.first.options = self.second.options = names
        if chosen is not None:
            self.choice.value = chosen
        self.first.value = keep_first if keep_first in names else (names[0] if names else None)
        second = keep_second if keep_second in names and keep_second != self.first.value else None
        if second is None and len(names) >= 2:
            second = names[-1] if names[-1] != self.first.value else names[0]
        self.second.value = second

    # ------------------------------------------------------------------ buttons
    def keep(self) -> bool:
        """Keep the model's current update under the typed name (what Keep as adapter… does)."""
        self._drop_armed = False
        refused = self._refused("keep an adapter")
        if refused:
            return self._refuse(refused)
        try:
            adapter = keep_adapter(self.model, self.name.value, self.adapters)
        except ValueError as exc:
            return self._refuse(f"Cannot keep: {error_message(exc)}")
        self.adapters[adapter.name] = adapter
        self._refresh_choices(chosen=adapter.name)
        self.name.value = ""
        self.status.success(f"kept {adapter.describe()}; train the next one, then Compare A vs B")
        return True

    def use(self) -> bool:
        """Put the chosen adapter's update into the model (what Use does)."""
        self._drop_armed = False
        refused = self._refused("switch adapters")
        if refused:
            return self._refuse(refused)
        adapter = self.adapters.get(self.choice.value)
        if adapter is None:
            return self._refuse("Cannot use: no adapter kept yet (train, name it, Keep as adapter…)")
        if unkept(self.model, self.adapters.values()):
            return self._refuse(f"Cannot use {adapter.name!r}: {UNKEPT}")
        try:
            use_adapter(self.model, adapter)
        except (ValueError, RuntimeError) as exc:
            return self._refuse(f"Cannot use {adapter.name!r}: {error_message(exc)}")
        self.status.success(f"the model now computes {adapter.describe()}")
        return True

    def none(self) -> bool:
        """Take every update off the model (what None does); an unkept update needs a second press."""
        refused = self._refused("switch adapters")
        if refused:
            self._drop_armed = False
            return self._refuse(refused)
        dropped = unkept(self.model, self.adapters.values())
        if dropped and not self._drop_armed:
            self._drop_armed = True
            return self._refuse("the model carries an update that is not kept as an adapter: keep it first, or "
                                "press None again to drop it")
        self._drop_armed = False
        try:
            use_none(self.model)
        except (ValueError, RuntimeError) as exc:
            return self._refuse(f"Cannot unload: {error_message(exc)}")
        self.status.success("the model computes no update now (its frozen weights)"
                            + ("; the unkept update was dropped" if dropped else ""))
        return True

    def compare(self) -> bool:
        """Evaluate adapters A and B on the same questions (what Compare A vs B does)."""
        self._drop_armed = False
        refused = self._refused("compare")
        if refused:
            return self._refuse(refused)
        if len(self.adapters) < 2:
            return self._refuse(f"Cannot compare: keep two adapters first ({len(self.adapters)} kept)")
        a, b = self.adapters.get(self.first.value), self.adapters.get(self.second.value)
        if a is None or b is None:
            return self._refuse("Cannot compare: pick adapters A and B")
        if a.name == b.name:
            return self._refuse(f"Cannot compare {a.name!r} with itself: pick two different adapters")
        if self.eval_fn is None:
            return self._refuse("Cannot compare: no evaluation (give the dashboard a tokenizer and data with a "
                                "validation split, or eval_fn=)")
        try:
            for adapter in (a, b):
                _check_frozen(self.model, adapter)
        except ValueError as exc:
            return self._refuse(f"Cannot compare: {error_message(exc)}")
        self.error, self.comparison = None, None
        self.compare_button.description = "Compare (running…)"
        self.status.info(f"evaluating {a.name!r} and {b.name!r} on the same questions…")
        if not self.background:
            self._run(a, b)
            return True
        self._thread = threading.Thread(target=self._run, args=(a, b), name="rowsft-compare", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> dict | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.comparison

    def _run(self, a: KeptAdapter, b: KeptAdapter) -> None:
        try:
            self.comparison = compare_adapters(self.model, a, b, self.eval_fn)
            self.result.value = (f"<pre style='font-size:12px'>{html.escape(comparison_text(self.comparison))}</pre>")
            self.status.success(f"compared {a.name!r} and {b.name!r}; the model is as before")
        except BaseException as exc:  # noqa: BLE001 - a thread's error must reach the user
            self.error = exc
            log.debug("comparison failed", exc_info=True)
            self.status.error(f"Comparison failed: {error_message(exc)}")
        finally:
            self.compare_button.description = "Compare A vs B"
