# SPDX-License-Identifier: Apache-2.0
"""The compiled call signature (packed_kernels._host.call_signature) keys calls exactly as the
Python signature_of does: two calls share a compiled key if and only if they share the Python
one, and the hot path's argument types (plain tensors, Parameters, ints, None, str, bool, tuples
and lists of ints) get a compiled key at all, or the ops' repeated calls would pay the Python
signature again."""

import itertools

import pytest
import torch

from conftest import require_compiled_call_signature
from packed_kernels import _checks
from packed_kernels.ops import conv_checks


class _Subclass(torch.Tensor):
    pass


def _compiled():
    require_compiled_call_signature()
    return _checks.compiled_call_signature


def _tensors():
    x = torch.zeros(2, 3, 4, 4)
    return [x, torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, 4, dtype=torch.float16),
            torch.zeros(2, 3, 4, 4, device="meta"), x.to(memory_format=torch.channels_last),
            x[:, :, :, :4], torch.nn.Parameter(x.clone()), torch.zeros(()), torch.zeros(0, 3),
            x.as_subclass(_Subclass)]


HOT_PATH_VALUES = [None, 0, 1, -1, 2, 2 ** 62, True, False, "same", "valid", "", "relu", (1, 1),
                   (1, 2), [1, 1], (), (1, True), ("a", None)]
OTHER_VALUES = [1.0, 2 ** 70, torch.Size([1, 1]), ((1, 1),), [[1]], object(), "\ud800"]


def _python_key(*args):
    return tuple(map(_checks.signature_of, args))


def test_hot_path_arguments_get_a_compiled_key():
    call_signature = _compiled()
    for value in HOT_PATH_VALUES + _tensors()[:-1]:
        assert call_signature(value) is not None, value
    x, w = torch.randn(2, 8, 4, 4), torch.nn.Parameter(torch.randn(8, 2, 3, 3))
    assert call_signature(x, w, None, 1, 1, 1, 4) is not None
    assert call_signature(x, w, None, (1, 1), "same", 1, 4, x[:, :1], None, "relu", None, None,
                          x, None, False) is not None


@pytest.mark.parametrize("value", OTHER_VALUES + _tensors()[-1:],
                         ids=lambda value: type(value).__name__)
def test_other_arguments_are_left_to_the_python_signature(value):
    call_signature = _compiled()
    assert call_signature(value) is None
    assert call_signature(torch.zeros(1), value, 1) is None


def test_compiled_keys_agree_with_the_python_signature_pairwise():
    """Every pair of one-argument and two-argument calls: equal compiled keys exactly when the
    Python keys are equal (where both calls have a compiled key)."""
    call_signature = _compiled()
    values = HOT_PATH_VALUES + _tensors() + OTHER_VALUES[:4]
    calls = [(v,) for v in values] + list(itertools.product(values[:12] + _tensors()[:3], repeat=2))
    calls.append(())
    keyed = [(call, call_signature(*call), _python_key(*call)) for call in calls]
    keyed = [(call, compiled, python) for call, compiled, python in keyed if compiled is not None]
    assert len(keyed) > len(calls) // 2
    for (call_a, compiled_a, python_a), (call_b, compiled_b, python_b) in itertools.combinations(keyed, 2):
        assert (compiled_a == compiled_b) == (python_a == python_b), (call_a, call_b)


def test_compiled_key_follows_in_place_changes_of_shape():
    call_signature = _compiled()
    x = torch.zeros(2, 3)
    before = call_signature(x)
    x.resize_(3, 2)
    assert call_signature(x) != before
    assert call_signature(x) == call_signature(torch.zeros(3, 2))


@pytest.mark.parametrize("fn", ["grouped_conv2d", "fused_conv2d"])
def test_each_way_of_keying_remembers_a_valid_call_once(call_keys, fn):
    import packed_kernels as pk
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    calls = conv_checks._grouped_calls if fn == "grouped_conv2d" else conv_checks._fused_calls
    for _ in range(3):
        getattr(pk, fn)(x, w, padding=1, groups=2)
    assert len(calls.entries) == 1
    key = next(iter(calls.entries))
    assert isinstance(key, bytes) == (call_keys == "compiled")
    with pytest.raises(ValueError, match="divisible by groups"):
        getattr(pk, fn)(x, w, padding=1, groups=3)
    assert len(calls.entries) == 1
