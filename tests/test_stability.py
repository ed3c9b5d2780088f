"""Merges with little or odd calibration data stay at the sources' scale, or say why (issue #15)."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import pleas
from toy_models import VGGBN, randomise_norm_stats


@pytest.fixture(scope="module")
def untrained_resnet18_pair():
    """Two untrained torchvision resnet18s: their BatchNorms store mean 0 and variance 1, which Gaussian
    inputs do not produce, and a layer4 conv reads 4,608 inputs from one position per image."""
    torchvision = pytest.importorskip("torchvision")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(torchvision.models.resnet18(num_classes=10).eval())
    fresh = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ensemble = (out[0](fresh) + out[1](fresh)) / 2
    return out, fresh, ensemble


def _relative_error(model, fresh, ensemble) -> float:
    with torch.no_grad():
        return float((model(fresh) - ensemble).norm() / ensemble.norm())


def _merge(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pleas.merge(*args, progress=False, **kwargs)


@pytest.mark.parametrize("n", [128, 512])
def test_few_samples_are_no_worse_than_the_merge_without_the_refit(untrained_resnet18_pair, n):
    (a, b), fresh, ensemble = untrained_resnet18_pair
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
    refitted = _merge(a, b, x, method="pleas")
    plain = _merge(a, b, x, method="rebasin")  # the same matching and layout, no refit
    assert _relative_error(refitted.model, fresh, ensemble) <= _relative_error(plain.model, fresh, ensemble)
    sparse = [e for e in refitted.report["refit"] if "heldout_rows" in e]
    assert sparse and all(e["rows"] < e["columns"] for e in sparse)  # chosen on held-out inputs, and said so
    assert any("fewer calibration samples" in w for w in refitted.report["warnings"])


@pytest.mark.parametrize("data", ["two samples", "constant"])
def test_degenerate_data_warns_and_stays_at_the_sources_scale(untrained_resnet18_pair, data):
    (a, b), fresh, ensemble = untrained_resnet18_pair
    x = torch.randn(2, 3, 32, 32) if data == "two samples" else torch.zeros(32, 3, 32, 32)
    with pytest.warns(UserWarning):
        result = pleas.merge(a, b, x, method="pleas", progress=False)
    with torch.no_grad():
        out = result.model(fresh)
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) <= 10 * float(ensemble.abs().max())


def test_norm_statistics_come_from_the_data_only_when_it_matches_the_sources():
    """For the refitted merge (pleas); a merge without a refit recomputes them on the data in any case."""
    a, b = (randomise_norm_stats(VGGBN(), s) for s in (0, 1))
    x = torch.randn(64, 3, 16, 16)
    foreign = _merge(a, b, x, method="pleas")
    assert foreign.report["norm_stats"] == "sources" and "differs" in foreign.report["norm_stats_reason"]
    unrefitted = _merge(a, b, x, method="rebasin")
    assert unrefitted.report["norm_stats"] == "data" and "no refit" in unrefitted.report["norm_stats_reason"]
    for m in (a, b):  # make the stored statistics those of this data (what training on it gives)
        for norm in m.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.reset_running_stats()
                norm.momentum = None
        m.train()
        with torch.no_grad():
            m(x)
        m.eval()
    native = _merge(a, b, x, method="pleas")
    assert native.report["norm_stats"] == "data" and "matches" in native.report["norm_stats_reason"]
    forced = _merge(a, b, x, method="rebasin", norm_stats="sources")
    assert forced.report["norm_stats"] == "sources" and forced.report["norm_stats_reason"] == "asked for"


def test_thread_counts_agree_to_round_off(tmp_path):
    """Bit-for-bit determinism is promised for one machine and thread count; across thread counts the
    merged model's outputs agree to float32 round-off (the ill-conditioned directions no longer matter)."""
    script = tmp_path / "merge.py"
    script.write_text(
        "import sys, torch, warnings, pleas\n"
        "sys.path.insert(0, sys.argv[3])\n"
        "from toy_models import VGGBN, randomise_norm_stats\n"
        "warnings.simplefilter('ignore')\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "models = []\n"
        "for s in (0, 1):\n"
        "    torch.manual_seed(s)\n"
        "    models.append(randomise_norm_stats(VGGBN(), s))\n"
        "a, b = models\n"
        "x = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))\n"
        "m = pleas.merge(a, b, x, method='pleas', budget=1.3, progress=False).model\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))), sys.argv[2])\n"
    )
    import pathlib

    here = str(pathlib.Path(__file__).parent)
    outs = []
    for threads in (1, 2):
        path = tmp_path / f"out{threads}.pt"
        subprocess.run([sys.executable, str(script), str(threads), str(path), here], check=True)
        outs.append(torch.load(path))
    scale = float(outs[0].abs().max())
    assert float((outs[0] - outs[1]).abs().max()) <= 1e-4 * scale


def test_norm_observer_merges_batch_moments_like_one_pass():
    """Per-batch moments merged pairwise equal one pass over all samples (float32 moments: tolerance
    1e-5 relative), and with batches above PER_BATCH samples the subset stays within sampling noise."""
    from types import SimpleNamespace

    from pleas.norms.observe import NormObserver

    gen = torch.Generator().manual_seed(0)
    norm = SimpleNamespace(name="bn", in_node="x", dim=1)
    batches = [torch.randn(40, 6, 5, 5, generator=gen) * (k + 1) + k for k in range(3)]
    observer = NormObserver([norm])
    for x in batches:
        observer.update([{"x": x}])
    mean, var, count = observer.moments(0, norm)
    want_var, want_mean = torch.var_mean(torch.cat(batches).double(), [0, 2, 3], correction=0)
    assert count == 3 * 40 * 25
    torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=1e-5)

    big = torch.randn(1000, 6, 5, 5, generator=gen) * 3 + 1
    sub = NormObserver([norm])
    sub.update([{"x": big}])
    mean, var, count = sub.moments(0, norm)
    assert count == NormObserver.PER_BATCH * 25
    # 1,600 samples per channel: the variance within about 4 standard errors (sqrt(2 / 1600) = 3.5%)
    assert ((var / 9 - 1).abs() < 0.15).all() and ((mean - 1).abs() < 0.35).all()
