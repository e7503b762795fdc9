"""The budget explorer as a widget: pick budgets, metrics and seeds, press Explore, read the figure.

Each point is a short fine-tune from the pretrained model (``rowsft.explore_budgets``), run in a
background thread with a progress bar; Stop ends the exploration after the current point. The
figure (``rowsft.viz.budget_explorer``) and the text summary (intervals, majority class, paired
tests of taylor against random and against zero-shot) refresh after every point. With a cache
file, pressing Explore again re-plots at once and runs only the points that are new.
"""
from __future__ import annotations

import dataclasses
import html
import threading
from typing import Callable

import ipywidgets as widgets
import plotly.graph_objects as go

from rowsft import viz
from rowsft.explore.budgets import ExploreConfig, budget_label, explore_budgets
from rowsft.explore.summary import summary_text
from rowsft.notebook._widgets import Displayable, StatusArea, error_message, log, refresh_figure
from rowsft.scoring.scorer import allowed_metrics


def parse_budget_list(text: str) -> list[str]:
    """``"1, 2 4 lora:8"`` → ``["1", "2", "4", "lora:8"]`` (commas or spaces)."""
    budgets = [part for part in text.replace(",", " ").split() if part]
    if not budgets:
        raise ValueError("give at least one budget, e.g. 1, 2, 4, lora:8")
    return budgets


class ExplorerPanel(Displayable):
    """Widgets around :func:`rowsft.explore_budgets` for one ``config`` (model, task, run length).

    ``busy_fn()`` returns why exploring must wait (e.g. a run is training), or None.
    ``explore_fn`` replaces ``explore_budgets`` (tests); ``background=False`` runs in the caller's thread.
    """

    def __init__(self, config: ExploreConfig | None = None, busy_fn: Callable[[], str | None] | None = None,
                 explore_fn: Callable | None = None, background: bool = True):
        self.config = config or ExploreConfig()
        self.busy_fn, self.explore_fn, self.background = busy_fn, explore_fn or explore_budgets, background
        self.records: list[dict] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        wide = widgets.Layout(width="260px")
        self.budgets = widgets.Text(value=", ".join(map(budget_label, self.config.budgets)), description="budgets",
                                    layout=wide)
        choices = list(allowed_metrics(self.config.unit))
        self.metrics = widgets.SelectMultiple(options=choices, value=[m for m in self.config.metrics if m in choices],
                                              description="metrics", rows=min(6, len(choices)))
        self.seeds = widgets.BoundedIntText(value=len(self.config.seeds), min=1, max=20, description="seeds",
                                            layout=widgets.Layout(width="150px"))
        self.steps = widgets.BoundedIntText(value=self.config.steps, min=1, max=10 ** 6, description="steps",
                                            layout=widgets.Layout(width="150px"))
        self.explore_button = widgets.Button(description="Explore", button_style="primary", icon="search")
        self.explore_button.add_class("rowsft-explore")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="240px"))
        self.status = StatusArea()
        self.figure = go.FigureWidget()
        self.summary = widgets.HTML("")
        self.explore_button.on_click(lambda _: self.explore())
        self.stop_button.on_click(lambda _: self.stop())
        about = widgets.HTML(f"<i>each point fine-tunes a fresh <b>{html.escape(self.config.model)}</b> on "
                             f"<b>{html.escape(self.config.task)}</b> for the given steps and evaluates it on the same "
                             f"{self.config.eval_examples} held-out questions; it does not change the model above</i>")
        self.widget = widgets.VBox([about, widgets.HBox([self.budgets, self.seeds, self.steps]), self.metrics,
                                    widgets.HBox([self.explore_button, self.stop_button, self.progress]),
                                    self.status, self.figure, self.summary])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def current_config(self) -> ExploreConfig:
        """The config the controls describe (a ValueError naming the control when one is wrong)."""
        return dataclasses.replace(self.config, budgets=parse_budget_list(self.budgets.value),
                                   metrics=list(self.metrics.value), seeds=list(range(int(self.seeds.value))),
                                   steps=int(self.steps.value))

    def explore(self) -> bool:
        """Start an exploration (what Explore does); False (and a message) when it cannot start."""
        if self.running:
            self.status.error("an exploration is already running: press Stop or wait for it to end")
            return False
        reason = self.busy_fn() if self.busy_fn is not None else None
        if reason:
            self.status.error(f"Cannot explore now: {reason}")
            return False
        try:
            config = self.current_config()
        except (ValueError, TypeError) as exc:
            self.status.error(f"Cannot explore: {error_message(exc)}")
            return False
        self._stop = threading.Event()
        self.error, self.progress.value, self.progress.bar_style = None, 0, "info"
        self.explore_button.description, self.stop_button.disabled = "Explore (running…)", False
        self.status.info("exploring… (cached points are read, new ones fine-tuned one by one)")
        if not self.background:
            self._run(config)
            return True
        self._thread = threading.Thread(target=self._run, args=(config,), name="rowsft-explore", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """End the exploration after the current point (what Stop does)."""
        if self.running:
            self._stop.set()
            self.status.info("stopping after the current point…")

    def wait(self, timeout: float | None = None) -> list[dict]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.records

    def _point_done(self, done: int, total: int, record: dict) -> None:
        self.progress.max, self.progress.value = total, done
        self.records.append(record)
        self.redraw()

    def redraw(self) -> None:
        """Figure and summary of the records so far."""
        if not self.records:
            return
        refresh_figure(self.figure, viz.budget_explorer(self.records))
        self.summary.value = f"<pre style='font-size:12px'>{html.escape(summary_text(self.records))}</pre>"

    def _run(self, config: ExploreConfig) -> None:
        self.records = []
        try:
            self.explore_fn(config, progress=self._point_done, stop=self._stop.is_set)
            stopped = self._stop.is_set()
            self.progress.bar_style = "warning" if stopped else "success"
            self.status.success(f"{'stopped after' if stopped else 'done:'} {len(self.records)} points")
        except BaseException as exc:  # noqa: BLE001 - a thread's error must reach the user
            self.error = exc
            log.debug("exploration failed", exc_info=True)
            self.progress.bar_style = "danger"
            self.status.error(f"Exploration failed: {error_message(exc)}")
        finally:
            self.explore_button.description, self.stop_button.disabled = "Explore", True
