"""The KV cache keyword is read from the forward's signature, and the output's cache from its fields."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest

import expertflow
from expertflow.adapters.kv_argument import KVArgument
from expertflow.errors import ExpertflowError


def forward_new(input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):  # transformers >= 5.24
    return None


def forward_old(input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):  # 5.0-5.23
    return None


def test_new_signature_takes_cache():
    kv = KVArgument.of(forward_new)
    assert kv.name == "cache"
    assert kv.inputs("KV") == {"cache": "KV"}


def test_old_signature_takes_past_key_values():
    kv = KVArgument.of(forward_old)
    assert kv.name == "past_key_values"
    assert kv.inputs(None) == {"past_key_values": None}


def test_both_names_prefer_the_new_one():
    def forward(cache=None, past_key_values=None):
        return None

    assert KVArgument.of(forward).name == "cache"


def test_wrapped_bound_forward_shows_the_real_parameters():
    """transformers' decorators wrap forward in (*args, **kwargs) with functools.wraps, on a bound method."""
    def renaming(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            return func(*args, **kwargs)
        return wrapped

    class Model:
        @renaming
        def forward(self, input_ids=None, cache=None):
            return None

    assert KVArgument.of(Model().forward).name == "cache"


def test_forward_without_a_kv_argument_is_a_one_line_error():
    def forward(input_ids=None, **kwargs):
        return None

    with pytest.raises(ExpertflowError, match="forward takes neither `cache` nor `past_key_values`") as info:
        KVArgument.of(forward)
    assert "\n" not in str(info.value)


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="'kv'"):
        KVArgument("kv")


@dataclass
class NewOutput:
    logits: object
    cache: object

    @property
    def past_key_values(self):  # what transformers 5.24 keeps for old readers (it logs a deprecation)
        raise AssertionError("the deprecated property was read")


@dataclass
class OldOutput:
    logits: object
    past_key_values: object


def test_output_prefers_the_cache_field():
    assert KVArgument.output(NewOutput(logits=0, cache="KV")) == "KV"


def test_output_falls_back_to_past_key_values():
    assert KVArgument.output(OldOutput(logits=0, past_key_values="KV")) == "KV"


def test_output_without_a_cache_field_is_an_error():
    @dataclass
    class Output:
        logits: object

    with pytest.raises(ExpertflowError, match="Output holds neither `cache` nor `past_key_values`"):
        KVArgument.output(Output(logits=0))


def test_engine_passes_the_installed_name():
    """No deprecation warning from our calls on the installed transformers, whatever its release."""
    model = expertflow.from_pretrained(cache_experts=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model.generate("The capital of France is", max_new_tokens=3)
    assert len(out.sequences[0]) == 3
