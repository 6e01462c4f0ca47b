"""Mistral (exported as the llama family) with a sliding window shorter than the test sequences:
both engines against transformers, so the window is really exercised."""

from __future__ import annotations

import numpy as np
import pytest

import edgeadapt

from arch_common import check_cached_decode, check_left_padded, check_logits, export, randomize
from conftest import ENGINES, SIZES, torch_logits

WINDOW = 3


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("mistral")
    cfg = MistralConfig(**{**SIZES, "sliding_window": WINDOW, "bos_token_id": 1, "eos_token_id": 2,
                           "attn_implementation": "eager"})
    model = randomize(MistralForCausalLM(cfg), 5, norm_around=1.0)
    return dict(model=model, base=export(model, root))


@pytest.fixture
def ids():
    return np.random.default_rng(2).integers(3, 256, size=(2, 10)).tolist()  # 10 tokens > window 3


def test_card_has_the_window(mistral):
    cfg = edgeadapt.load(mistral["base"], engine="numpy")._engine.cfg
    assert (cfg.arch, cfg.sliding_window, cfg.swa_layers) == ("llama", WINDOW, None)


def test_window_changes_the_reference(mistral, ids):
    """Without the window transformers' own logits differ past it: the test sequences exercise it."""
    import copy

    full = copy.deepcopy(mistral["model"])
    full.config.sliding_window = None
    assert np.abs(torch_logits(full, ids)[:, WINDOW:] - torch_logits(mistral["model"], ids)[:, WINDOW:]).max() > 1e-2


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_match_transformers(mistral, ids, engine):
    check_logits(mistral["base"], mistral["model"], engine, ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_left_padded_batch(mistral, engine):
    check_left_padded(mistral["base"], mistral["model"], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_cached_decode_step(mistral, ids, engine):
    check_cached_decode(mistral["base"], mistral["model"], engine, ids)
