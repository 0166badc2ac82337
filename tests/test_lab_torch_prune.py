"""Structured and unstructured pruning, and knowledge distillation, on real small torch models."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgewise.lab.datasets import load_digits_images  # noqa: E402
from edgewise.lab.distill import distill, hinton_loss  # noqa: E402
from edgewise.lab.export import export_onnx, onnx_predict  # noqa: E402
from edgewise.lab.prune import (  # noqa: E402
    PruneError,
    compare_unstructured,
    structured_prune,
    unstructured_prune,
    weight_sparsity,
)
from edgewise.lab.torch_models import (  # noqa: E402
    DigitsCNN,
    DigitsMLP,
    MotionCNN,
    clone,
    count_params,
    example_input,
    predict_logits,
    train,
    width_scaled,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_digits():
    return load_digits_images().subset(600, 200)


@pytest.fixture(scope="module")
def teacher(small_digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    train(model, small_digits, epochs=4, lr=3e-3, seed=0)
    return model.eval()


# --------------------------------------------------------------------------- structured


def test_half_the_channels_really_go_and_the_onnx_shrinks(tmp_path, teacher, small_digits):
    original = [p.detach().clone() for p in teacher.parameters()]
    ex = example_input(small_digits, 2)
    res = structured_prune(teacher, ex, ratio=0.5, data=small_digits)
    # Every prunable layer keeps exactly half its channels; the output layer keeps its 10 classes.
    assert res.channels_before == {"features.0": 16, "features.4": 32, "features.8": 64, "classifier.1": 10}
    assert res.channels_after == {"features.0": 8, "features.4": 16, "features.8": 32, "classifier.1": 10}
    assert res.model.classifier[1].in_features == 32 * 4 * 4
    # Conv layers lose inputs and outputs: params and MACs fall between (1-r)^2 and 1-r of the original.
    assert 0.25 - 0.02 <= res.params_ratio <= 0.5 and 0.25 - 0.02 <= res.macs_ratio <= 0.5
    assert res.after.params == count_params(res.model)
    # The input model is untouched.
    assert count_params(teacher) == res.before.params
    assert all(torch.equal(a, b) for a, b in zip(original, teacher.parameters(), strict=True))
    assert res.accuracy_before is not None and res.accuracy_after is not None
    # Exported, it is smaller, and ONNX Runtime runs it to the same logits.
    before = export_onnx(teacher, ex, tmp_path / "before.onnx")
    after = export_onnx(res.model, ex, tmp_path / "after.onnx")
    assert after.size_bytes < 0.5 * before.size_bytes
    x = small_digits.x_test[:16]
    np.testing.assert_allclose(onnx_predict(after.path, x), predict_logits(res.model, x).numpy(), rtol=1e-3, atol=1e-4)


def test_a_mac_target_is_met_in_small_increments(teacher, small_digits):
    res = structured_prune(teacher, example_input(small_digits, 2), target_macs=0.4)
    assert res.mode == "macs" and res.target_met
    assert res.after.macs <= 0.4 * res.before.macs
    assert res.after.macs > 0.2 * res.before.macs  # it stops near the target, not far below it
    absolute = structured_prune(teacher, example_input(small_digits, 2), target_macs=1_000_000)
    assert absolute.after.macs <= 1_000_000


def test_iterative_pruning_fine_tunes_after_each_step(teacher, small_digits):
    res = structured_prune(teacher, example_input(small_digits, 2), ratio=0.5, steps=2, data=small_digits,
                           finetune_epochs=2, lr=1e-3)
    assert [s.step for s in res.steps] == [1, 2]
    assert res.steps[0].params > res.steps[1].params == res.after.params
    assert res.channels_after["features.8"] == 32
    assert all(s.accuracy_finetuned is not None for s in res.steps)
    assert res.accuracy_after == res.steps[-1].accuracy_finetuned and res.accuracy_after > 0.85


@pytest.mark.parametrize("factory, shape, layer", [(DigitsMLP, (1, 64), "net.0"), (MotionCNN, (1, 6, 100), "features.0")])
def test_mlps_and_1d_cnns_prune_too_even_from_one_sample(factory, shape, layer):
    torch.manual_seed(0)
    model = factory().eval()
    res = structured_prune(model, torch.randn(*shape), ratio=0.5)
    assert res.channels_after[layer] == res.channels_before[layer] // 2
    assert res.after.params < 0.5 * res.before.params
    out = res.model(torch.randn(3, *shape[1:]))
    assert out.shape == (3, model(torch.randn(3, *shape[1:])).shape[1])


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 0.0}, "between 0 and 1"),
    ({"ratio": 1.0}, "between 0 and 1"),
    ({"ratio": 1.5}, "between 0 and 1"),
    ({}, "exactly one"),
    ({"ratio": 0.5, "target_macs": 0.5}, "exactly one"),
    ({"target_macs": -1}, "must be > 0"),
    ({"target_macs": 10**12}, "not below"),
    ({"ratio": 0.5, "finetune_epochs": 2}, "needs data"),
    ({"ratio": 0.5, "importance": "taylor"}, "'l1' or 'l2'"),
])
def test_bad_pruning_requests_say_what_is_wrong(kwargs, message):
    with pytest.raises(PruneError, match=message):
        structured_prune(DigitsCNN(), torch.zeros(2, 1, 32, 32), **kwargs)


# --------------------------------------------------------------------------- unstructured


def test_unstructured_pruning_zeros_weights_but_changes_no_shape(tmp_path, teacher, small_digits):
    sparse = unstructured_prune(teacher, 0.6)
    sp = weight_sparsity(sparse)
    for name, m in sparse.named_modules():
        if name in sp:
            assert abs(sp[name] - 0.6) <= 1 / m.weight.numel()
    assert sp["total"] == pytest.approx(0.6, abs=0.01)
    assert weight_sparsity(teacher)["total"] < 0.01  # the original keeps its weights
    assert count_params(sparse) == count_params(teacher)
    assert {k: v.shape for k, v in sparse.state_dict().items()} == {k: v.shape for k, v in teacher.state_dict().items()}
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in sparse.named_parameters())  # made permanent

    cmp = compare_unstructured(teacher, example_input(small_digits), 0.6, tmp_path, data=small_digits, latency_runs=6)
    assert cmp.params_after == cmp.params_before
    assert cmp.onnx_bytes_after == cmp.onnx_bytes_before  # dense storage: zeros cost as much as any float
    assert cmp.zlib_bytes_after < 0.8 * cmp.zlib_bytes_before  # ... but compress well
    assert cmp.latency_ms_before > 0 and cmp.latency_ms_after > 0  # measured; no timing assertions
    with pytest.raises(PruneError):
        unstructured_prune(teacher, 1.0)


# --------------------------------------------------------------------------- distillation


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_hinton_loss_is_the_formula_computed_by_hand():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = np.array([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    y = np.array([1, 2])
    temp = 3.0
    ps, pt = _softmax(s / temp), _softmax(t / temp)
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))  # KL(teacher || student), batch mean
    ce = np.mean(-np.log(_softmax(s)[np.arange(2), y]))
    args = (torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert float(hinton_loss(*args, temperature=temp, alpha=1.0)) == pytest.approx(temp**2 * kl, rel=1e-9)
    assert float(hinton_loss(*args, temperature=temp, alpha=0.0)) == pytest.approx(ce, rel=1e-9)
    assert float(hinton_loss(*args, temperature=temp, alpha=0.3)) == pytest.approx(0.3 * temp**2 * kl + 0.7 * ce, rel=1e-9)
    assert float(hinton_loss(torch.tensor(t), *args[1:], temperature=temp, alpha=1.0)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        hinton_loss(*args, temperature=0)
    with pytest.raises(ValueError):
        hinton_loss(*args, alpha=1.5)


def test_distillation_trains_a_smaller_student_and_its_plain_twin(teacher, small_digits):
    torch.manual_seed(3)
    student = width_scaled(DigitsCNN, 0.25)
    initial = clone(student)
    res = distill(teacher, student, small_digits, epochs=2, temperature=4.0, alpha=0.9, seed=5)
    assert res.student_stats.params < res.teacher_stats.params / 4
    assert res.baseline is not None and res.baseline_accuracy is not None and res.gain is not None
    # The plain twin is exactly the same student trained with cross-entropy: same start, seed and epochs.
    twin = clone(initial)
    train(twin, small_digits, 2, 3e-3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), res.baseline.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), res.student.state_dict().values(), strict=True))
    # Neither the given student nor the teacher changed.
    assert all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(), student.state_dict().values(), strict=True))
    assert all(p.requires_grad for p in teacher.parameters())
    doc = res.to_json()
    assert doc["student_plain"]["accuracy"] == res.baseline_accuracy and doc["temperature"] == 4.0


def test_distillation_refuses_a_student_with_other_outputs(teacher, small_digits):
    with pytest.raises(ValueError, match="must match"):
        distill(teacher, DigitsCNN(num_classes=5), small_digits, epochs=1)
