"""Bad input gets a clear error naming the problem and what is allowed (issue #15), and a model's dtype
is kept."""
import pytest
import torch

import pleas
from toy_models import MLP


def _pair():
    torch.manual_seed(0)
    a = MLP()
    torch.manual_seed(1)
    return a, MLP()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, r"batch_size=0; allowed: a positive integer"),
        ({"batch_size": -3}, r"batch_size=-3; allowed: a positive integer"),
        ({"method": "zipit", "alpah": 0.3}, r"no option 'alpah' \(did you mean 'alpha'\?\); its options: alpha, beta"),
        ({"method": "zipit", "alpha": "high"}, r"alpha='high'; allowed: a number >= 0"),
        ({"budget": "1.5"}, r"budget='1.5' is a str; allowed: a number >= 1"),
        ({"method": "pleas", "inputs": "both"}, r"inputs='both'; allowed: one of 'propagated', 'teacher'"),
        ({"norm_stats": "batch"}, r"norm_stats='batch'; allowed"),
        ({"dtype": torch.int32}, r"dtype=torch.int32; allowed: a floating-point torch.dtype"),
    ],
)
def test_bad_arguments_name_what_is_allowed(kwargs, match):
    a, b = _pair()
    kwargs = {"method": "average", **kwargs}
    with pytest.raises(pleas.MergeInputError, match=match):
        pleas.merge(a, b, torch.randn(8, 20), progress=False, **kwargs)


def test_a_model_without_weights_is_refused():
    a, _ = _pair()
    with torch.device("meta"):
        b = MLP()
    with pytest.raises(pleas.MergeInputError, match=r"model_b has tensors on the 'meta' device"):
        pleas.merge(a, b, torch.randn(8, 20), method="average")


def test_float64_models_stay_float64():
    a, b = (m.double() for m in _pair())
    result = pleas.merge(a, b, torch.randn(64, 20), method="pleas", progress=False)
    assert all(t.dtype == torch.float64 for t in result.model.state_dict().values() if t.is_floating_point())
    assert result.report["dtype"] == "float64"
    with torch.no_grad():
        assert result.model(torch.randn(4, 20, dtype=torch.float64)).dtype == torch.float64


def test_ids_are_never_cast_to_float():
    from pleas.calibration import Calibration

    ids = torch.randint(0, 100, (10, 7))
    batch = next(iter(Calibration(ids, batch_size=4, dtype=torch.float32)))
    assert batch.dtype == torch.int64 and torch.equal(batch, ids[:4])
    masks = next(iter(Calibration({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, batch_size=4)))
    assert masks["input_ids"].dtype == torch.int64 and masks["input_ids"].shape == (4, 7)
