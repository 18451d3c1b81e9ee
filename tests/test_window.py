"""The context window as each engine reports it: recorded answers (vLLM 0.32 /v1/models, llama.cpp /props)."""

from __future__ import annotations

import json
from pathlib import Path

from scout_diff_cache.observe.window import window_from_models, window_from_props

DATA = Path(__file__).parent / "data"


def test_vllm_reports_max_model_len_per_served_model() -> None:
    models = json.loads((DATA / "vllm" / "models.json").read_text())
    assert window_from_models(models, "tiny-llama4") == 32768
    assert window_from_models(models, None) == 32768  # the only model
    assert window_from_models(models, "an-alias") == 32768  # the one model served is the one asked for
    two = {"data": [*models["data"], {"id": "b", "max_model_len": 8192}]}
    assert window_from_models(two, "b") == 8192
    assert window_from_models(two, None) is None  # which one is meant is not known


def test_llama_cpp_reports_n_ctx_per_slot() -> None:
    props = json.loads((DATA / "llama_server" / "props.json").read_text())
    assert window_from_props(props) == props["default_generation_settings"]["n_ctx"] == 4096


def test_answers_without_a_window() -> None:
    for answer in (None, [], {"data": "x"}, {"data": [{"id": "m", "max_model_len": "32768"}]}, {"data": [{"id": "m"}]}):
        assert window_from_models(answer, "m") is None
    for answer in (None, {}, {"default_generation_settings": {"n_ctx": 0}}, {"default_generation_settings": []}):
        assert window_from_props(answer) is None
