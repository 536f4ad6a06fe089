"""timm's own model tests, unchanged, run on this package's variants in timm's registry and on timm's ConvMixer.

timm's `tests/test_models.py` is not part of timm's wheel, so it is read from a copy the environment names
(a clone of huggingface/pytorch-image-models, or timm's sdist, at the installed timm's version):

    CONVMIXER_TIMM_TESTS=/path/to/pytorch-image-models/tests/test_models.py pytest -q tests/test_timm_suite.py

Without it every test here is skipped; tests/test_timm_protocol.py re-expresses the same checks and runs
everywhere. Each of timm's test functions is re-created from its own code and module globals (its helpers,
size targets, model lists), without the parametrization it computed over timm's registry at import, and
parametrized here over our registered names and timm's `convmixer_*`, with timm's batch sizes. Only the model
lists are ours, and, unless CONVMIXER_TIMM_SIZES=1, the input-size targets the tests read (forward 96 px, the
others 64; timm's are 384/128/96), which keeps the run to a few minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import timm

import convmixer_pt.timm_models  # noqa: F401  (registers convmixer_pt_* in timm's registry)

TEST_FILE = os.environ.get("CONVMIXER_TIMM_TESTS")


def _load_timm_tests() -> types.ModuleType | None:
    if not TEST_FILE:
        return None
    spec = importlib.util.spec_from_file_location("timm_test_models", Path(TEST_FILE))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if os.environ.get("CONVMIXER_TIMM_SIZES") != "1":
        module.TARGET_FWD_SIZE = 96
        module.TARGET_BWD_SIZE = module.TARGET_JIT_SIZE = module.TARGET_FWD_FX_SIZE = 64
        module.TARGET_BWD_FX_SIZE = module.TARGET_FFEAT_SIZE = 64
    return module


TM = _load_timm_tests()
OURS = timm.list_models("convmixer_pt_*")
OURS_TAGGED = timm.list_models("convmixer_pt_*", include_tags=True)
THEIRS = timm.list_models("convmixer_*", exclude_filters=["convmixer_pt_*"])
THEIRS_TAGGED = timm.list_models("convmixer_*", exclude_filters=["convmixer_pt_*"], include_tags=True)
BOTH, BOTH_TAGGED = OURS + THEIRS, OURS_TAGGED + THEIRS_TAGGED
cfg_device = getattr(TM, "cfg_device", None)  # timm's fixture (the meta device), used by its cfg tests


def reuse(name: str, params: Callable[[Callable], Callable]) -> Callable:
    """timm's test `name` with its own code and globals, parametrized by `params`; a skip without the file."""
    original = getattr(TM, name, None)
    if original is None:
        def missing() -> None:
            pytest.skip(f"{name}: set CONVMIXER_TIMM_TESTS to timm's tests/test_models.py" if TM is None
                        else f"{name} is not in {TEST_FILE}")
        missing.__name__ = name
        return missing
    copy = types.FunctionType(original.__code__, original.__globals__, name, original.__defaults__,
                              original.__closure__)
    copy.__doc__ = original.__doc__
    return params(copy)


def models(names: list, batch_size: int | None = None) -> Callable[[Callable], Callable]:
    def decorate(test: Callable) -> Callable:
        if batch_size is not None:
            test = pytest.mark.parametrize("batch_size", [batch_size])(test)
        return pytest.mark.parametrize("model_name", names)(test)
    return decorate


def xfail(names: list, error: type[Exception], reason: str) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(raises=error, strict=True, reason=reason)) for n in names]


# The per-model tests, with timm's batch sizes.
test_model_forward = reuse("test_model_forward", models(BOTH, 1))
test_model_backward = reuse("test_model_backward", models(BOTH, 2))
# timm lists '*mixer_*' among its non-standard models because its ConvMixer cfg has pool_size None, which the
# standard cfg test cannot take; ours gives pool_size, so ours passes both.
test_model_default_cfgs = reuse("test_model_default_cfgs", models(
    OURS_TAGGED + xfail(THEIRS_TAGGED, TypeError, "timm's ConvMixer cfg has pool_size None"), 1))
test_model_default_cfgs_non_std = reuse("test_model_default_cfgs_non_std", models(BOTH_TAGGED, 1))
test_model_forward_torchscript = reuse("test_model_forward_torchscript", models(BOTH, 1))
test_model_forward_features = reuse("test_model_forward_features", models(BOTH, 1))
test_model_forward_intermediates_features = reuse("test_model_forward_intermediates_features", models(BOTH, 1))
test_model_forward_intermediates = reuse("test_model_forward_intermediates", models(BOTH, 1))
test_model_forward_fx = reuse("test_model_forward_fx", models(BOTH, 1))
test_model_backward_fx = reuse("test_model_backward_fx", models(BOTH, 2))
test_model_forward_fx_torchscript = reuse("test_model_forward_fx_torchscript", models(BOTH, 1))
# timm's API tests that take a model name (it runs them on fixed lists; the first holds convmixer_768_32).
test_head_hidden_size = reuse("test_head_hidden_size", pytest.mark.parametrize(
    "model_name, model_kwargs", [(n, {}) for n in BOTH]))
test_reset_classifier_keeps_pool = reuse("test_reset_classifier_keeps_pool", models(BOTH))
test_prune_intermediate_layers_params_used = reuse("test_prune_intermediate_layers_params_used", models(BOTH))
# timm's slowest (it prunes at every block): the small variants and the 1024/20 ones unless at timm's sizes.
test_prune_intermediate_layers_contract = reuse("test_prune_intermediate_layers_contract", models(
    BOTH if os.environ.get("CONVMIXER_TIMM_SIZES") == "1"
    else ["convmixer_pt_128_4", "convmixer_pt_256_8", "convmixer_pt_1024_20_ks9_p14", "convmixer_1024_20_ks9_p14"]))
test_feature_getter_stage_ends_torchscript = reuse("test_feature_getter_stage_ends_torchscript", models(BOTH))
# timm's FeatureGetterNet (features_only for both ConvMixers) has no set_grad_checkpointing: fails alike.
test_features_only_grad_checkpointing_backward = reuse("test_features_only_grad_checkpointing_backward", models(
    xfail(BOTH, AttributeError, "timm's FeatureGetterNet has no set_grad_checkpointing")))
