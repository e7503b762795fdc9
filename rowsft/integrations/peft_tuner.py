"""rowsft as a peft method: the tuner (``BaseTuner``) behind ``get_peft_model(model, RowSFTConfig(...))``.

:class:`RowSFTTuner` is what peft builds for a config whose ``peft_type`` is ``"ROWSFT"``. Per adapter it
plans the modules and positions (`rowsft.integrations.peft_plan.plan_adapter`, in ``_prepare_model``, before
any module changes), wraps each planned module in a `rowsft.integrations.peft_layer.RowSFTLayer` (or adds
the adapter to an existing one) and, as `rowsft.apply` does, tags norm outputs so that row and element
updates rebuild their inputs in backward instead of keeping them (`rowsft.layers.rebuild`). Everything else,
``set_adapter``, ``disable_adapter``, ``delete_adapter``, ``merge_and_unload``, saving, loading and
``modules_to_save``, is peft's own code.

Registration (:func:`register_with_peft`): peft 0.21's ``register_peft_method`` only accepts names of its
closed ``PeftType`` enum, so rowsft adds the plain string key ``"ROWSFT"`` to peft's three mappings (config,
tuner, prefix ``"rowsft_"``); ``PeftType`` is a ``str`` enum and peft only looks the key up, so no enum is
patched. A peft whose enum knows ``ROWSFT`` goes through ``register_peft_method``. :func:`peft_api_problems`
lists the peft interfaces this code relies on that a newer peft changed (the test suite runs it).
"""
from __future__ import annotations

import inspect

import peft
import torch
from peft import mapping, tuners
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners import tuners_utils
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import nn

from rowsft.integrations.peft_layer import RowSFTLayer
from rowsft.integrations.peft_plan import plan_adapter
from rowsft.layers.cast_weights import forget as forget_cast
from rowsft.layers.rebuild import track_norm_outputs

PEFT_TYPE = "ROWSFT"
PREFIX = "rowsft_"
PEFT_PIN = "peft>=0.21,<0.22"      # the peft releases this tuner is written against (pyproject's `peft` extra)


class RowSFTTuner(BaseTuner):
    """peft's model class for RowSFT adapters (``PeftModel.base_model``); see the module docstring."""

    prefix: str = PREFIX
    tuner_layer_cls = RowSFTLayer
    target_module_mapping: dict = {}

    # ---------------------------------------------------------------- planning and injection
    def _plans(self) -> dict:
        return self.__dict__.setdefault("rowsft_plans", {})

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        adapter = next((name for name, config in self.peft_config.items() if config is peft_config), None)
        plan = plan_adapter(model, peft_config)                 # checks everything; nothing changed yet
        peft_config.target_modules = set(plan)                  # peft then wraps exactly the planned modules
        self._plans()[adapter] = plan
        if peft_config.rebuild_inputs and not self.__dict__.get("rowsft_norm_hooks"):
            self.__dict__["rowsft_norm_hooks"] = track_norm_outputs(model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plan = self._plans().get(adapter_name, {})
        if current_key not in plan:
            raise KeyError(f"RowSFT planned no update for {current_key!r} (adapter {adapter_name!r})")
        choice = plan[current_key]
        dtype = getattr(torch, peft_config.delta_dtype) if peft_config.delta_dtype else None
        if isinstance(target, RowSFTLayer):
            target.update_layer(adapter_name, choice.unit, choice.indices, delta_dtype=dtype,
                                rebuild_input=peft_config.rebuild_inputs, inference_mode=peft_config.inference_mode,
                                keep_cast=peft_config.keep_cast_weights, in_cast=peft_config.train_in_cast,
                                lend=peft_config.lend_rows)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key} already carries another peft method's adapter")
        layer = RowSFTLayer(target, adapter_name, choice.unit, choice.indices, name=current_key, delta_dtype=dtype,
                            rebuild_input=peft_config.rebuild_inputs, keep_cast=peft_config.keep_cast_weights,
                            in_cast=peft_config.train_in_cast, lend=peft_config.lend_rows)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)                         # an added adapter is not trainable until set
        self._replace_module(parent, target_name, layer, target)

    # ---------------------------------------------------------------- unloading
    def _remove_norm_hooks(self) -> None:
        for handle in self.__dict__.pop("rowsft_norm_hooks", None) or []:
            handle.remove()

    def _forget_casts(self) -> None:
        """Free the base weights' copies kept under autocast (`rowsft.layers.cast_weights`): the weights outlive
        the adapter layers."""
        for module in self.model.modules():
            if isinstance(module, RowSFTLayer):
                forget_cast(module.get_base_layer())

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        self._forget_casts()
        model = super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        self._remove_norm_hooks()
        return model

    def unload(self) -> nn.Module:
        self._forget_casts()
        model = super().unload()
        self._remove_norm_hooks()
        return model


# ---------------------------------------------------------------- registration
def register_with_peft(config_cls) -> None:
    """Make peft know ``peft_type == "ROWSFT"`` (config class ``config_cls``, this tuner, prefix ``rowsft_``).
    Idempotent; refuses (RuntimeError) when another package already registered ROWSFT."""
    current = PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE)
    if current is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is RowSFTTuner:
        return
    if current is not None and getattr(current, "__module__", None) != config_cls.__module__:
        raise RuntimeError(f"peft already has a method {PEFT_TYPE!r} ({current.__module__}.{current.__name__}); "
                           f"rowsft cannot register its RowSFTConfig under that name")
    if current is None and any(t == PEFT_TYPE for t in PeftType):
        register_peft_method(name=PEFT_TYPE.lower(), config_cls=config_cls, model_cls=RowSFTTuner, prefix=PREFIX)
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = config_cls          # plain string key: no enum patching
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = RowSFTTuner
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def peft_api_problems() -> list[str]:
    """The peft interfaces RowSFT relies on that the installed peft lacks or changed (empty: all as in 0.21)."""
    problems = []

    def need(ok: bool, api: str, detail: str) -> None:
        if not ok:
            problems.append(f"peft {peft.__version__} changed {api}: {detail} (rowsft's RowSFT tuner is written "
                            f"against {PEFT_PIN})")

    for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        need(isinstance(getattr(mapping, name, None), dict), f"peft.mapping.{name}", "no longer a dict")
    expected = {
        "_prepare_model": ["self", "peft_config", "model"],
        "_prepare_adapter_config": ["self", "peft_config", "model_config"],
        "_replace_module": ["self", "parent", "child_name", "new_module", "child"],
        "_create_and_replace": ["self", "peft_config", "adapter_name", "target", "target_name", "parent",
                                "current_key"],
    }
    for method, params in expected.items():
        fn = getattr(BaseTuner, method, None)
        need(fn is not None and _parameters(fn)[:len(params)] == params, f"BaseTuner.{method}",
             f"expected parameters {params}, found {_parameters(fn) if fn else 'no such method'}")
    for method in ("merge_and_unload", "unload", "set_adapter", "delete_adapter", "inject_adapter"):
        need(callable(getattr(BaseTuner, method, None)), f"BaseTuner.{method}", "missing")
    for attr in ("set_adapter", "delete_adapter", "enable_adapters", "adapter_layer_names", "other_param_names",
                 "merged_adapters", "_active_adapter", "_disable_adapters", "active_adapters"):
        need(hasattr(BaseTunerLayer, attr), f"BaseTunerLayer.{attr}", "missing")
    check = getattr(tuners_utils, "check_target_module_exists", None)
    need(check is not None and _parameters(check) == ["config", "key"], "tuners_utils.check_target_module_exists",
         "expected check_target_module_exists(config, key)")
    need(callable(getattr(tuners_utils, "check_adapters_to_merge", None)), "tuners_utils.check_adapters_to_merge",
         "missing")
    buffer_dict = getattr(getattr(tuners, "_buffer_dict", None), "BufferDict", None)
    need(buffer_dict is not None and "persistent" in _parameters(buffer_dict.__init__),
         "peft.tuners._buffer_dict.BufferDict", "expected BufferDict(buffers=None, persistent=False)")
    need(isinstance(inspect.getattr_static(PeftConfig, "check_kwargs", None), classmethod), "PeftConfig.check_kwargs",
         "no longer a classmethod run on every loaded adapter_config.json")
    return problems


__all__ = ["RowSFTTuner", "register_with_peft", "peft_api_problems", "PEFT_TYPE", "PREFIX", "PEFT_PIN"]
