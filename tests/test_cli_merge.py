"""``pleas merge``: checkpoints in, merged safetensors out, same model as the API; nothing written on error."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import pleas
from pleas.cli import main
from pleas.io import load_merged, load_model
from pleas.methods import METHODS
from toy_models import VGGBN, randomise_norm_stats

ARCH = "toy_models:VGGBN"  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two checkpoints (safetensors, and a torch file with a 'state_dict' entry) and calibration data."""
    d = tmp_path_factory.mktemp("inputs")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.contiguous() for k, v in randomise_norm_stats(VGGBN(), seed=seed).state_dict().items()})
    save_file(states[0], str(d / "a.safetensors"))
    torch.save({"state_dict": states[1], "epoch": 7}, d / "b.pt")
    torch.save(torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0)), d / "calib.pt")
    return {"a": str(d / "a.safetensors"), "b": str(d / "b.pt"), "data": str(d / "calib.pt"), "dir": d}


def _merge_args(files, out, *extra):
    return ["merge", files["a"], files["b"], "--arch", ARCH, "--data", files["data"], "--out", str(out), *extra]


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("method, budget, heads", [("zipit", 1.0, "separate"), ("rebasin", 1.5, "shared")])
def test_merge_from_files_equals_the_api(tmp_path, files, capsys, method, budget, heads):
    out, report = tmp_path / "merged.safetensors", tmp_path / "merged.json"
    code = main(_merge_args(files, out, "--method", method, "--budget", str(budget), "--heads", heads,
                            "--report", str(report)))
    assert code == 0
    text = capsys.readouterr().out
    assert method in text and "size" in text and "widths" in text and "seconds" in text

    model_a, model_b = load_model(ARCH, {}, files["a"]), load_model(ARCH, {}, files["b"])
    data = torch.load(files["data"], weights_only=True)
    api = pleas.merge(model_a, model_b, data, method=method, budget=budget, heads=heads, progress=False)
    loaded = load_merged(VGGBN(), out)
    want = api.model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())
    x = torch.randn(6, 3, 16, 16)
    for got, ref in zip(_outputs(loaded, x), _outputs(api.model, x), strict=True):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)

    rep = json.loads(report.read_text())
    assert rep["method"] == method and rep["heads"] == heads and rep["info"] == {"arch": ARCH, "kwargs": {}}
    assert rep["size"]["relative_dense"] == pytest.approx(api.report["size"]["relative_dense"])


def test_effective_budget_from_the_shell(tmp_path, files, capsys):
    out, report = tmp_path / "merged.safetensors", tmp_path / "merged.json"
    assert main(_merge_args(files, out, "--method", "rebasin", "--budget", "1.4", "--budget-metric", "effective_params",
                            "--report", str(report))) == 0
    text = capsys.readouterr().out
    assert "without the zero blocks" in text and "allocation='downstream'" in text
    rep = json.loads(report.read_text())
    assert rep["budget_metric"] == "effective_params" and rep["allocation"] == "downstream"
    assert rep["size"]["relative_effective"] <= 1.4 + 1e-9 < rep["size"]["relative_dense"]


def test_same_seed_gives_identical_bytes(tmp_path, files):
    outs = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    for out in outs:
        assert main(_merge_args(files, out, "--method", "rebasin", "--budget", "1.3", "--heads", "separate",
                                "--seed", "5")) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def _garbage(d):
    (d / "garbage.safetensors").write_bytes(b"\x00\x01 not a model " * 10)
    return str(d / "garbage.safetensors")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda f, d: {"a": str(d / "missing.safetensors")}, "does not exist"),
        (lambda f, d: {"b": _garbage(d)}, "could not be read"),
        (lambda f, d: {"extra": ["--kwargs", '{"width": 4}']}, "does not fit architecture"),
        (lambda f, d: {"extra": ["--budget", "0.5", "--method", "rebasin"]}, "budget=0.5 is out of range"),
        (lambda f, d: {"extra": ["--budget", "99", "--method", "rebasin"]}, "reachable for this model"),
        (lambda f, d: {"extra": ["--method", "no_such_method"]}, "unknown method 'no_such_method'; known methods"),
        (lambda f, d: {"data": "no_such_data"}, "unknown calibration data"),
        (lambda f, d: {"data": "digits"}, "calibration batches of shape"),
        (lambda f, d: {"extra": ["--max-memory", "1MB"]}, "is estimated to peak at"),
    ],
    ids=["missing", "garbage", "wrong-arch", "budget-low", "budget-high", "unknown-method", "unknown-data",
         "data-shape", "max-memory"],
)
def test_errors_exit_2_and_leave_no_file(tmp_path, files, capsys, change, match):
    args = dict(files)
    changes = change(files, tmp_path)
    extra = changes.pop("extra", [])
    args.update(changes)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "merged.safetensors"
    code = main(_merge_args(args, out, "--report", str(tmp_path / "merged.json"), *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pleas: error: ") and match in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file


def test_never_overwrites_an_input(tmp_path, files, capsys):
    before = open(files["a"], "rb").read()
    assert main(_merge_args(files, files["a"], "--method", "rebasin")) == 2
    assert "is an input file" in capsys.readouterr().err
    assert open(files["a"], "rb").read() == before


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_no_output_may_be_an_input_or_another_output(tmp_path, files, capsys, flag):
    """A plot or report path equal to an input (formats are read from content, so a checkpoint may be
    named .png) or to another output is refused before any work, and nothing is written."""
    import shutil

    renamed = tmp_path / "a_copy.png"
    shutil.copy(files["a"], renamed)
    before = renamed.read_bytes()
    args = dict(files, a=str(renamed))
    out = tmp_path / "merged.safetensors"
    assert main(_merge_args(args, out, "--method", "rebasin", flag, str(renamed))) == 2
    assert "is an input file" in capsys.readouterr().err
    assert renamed.read_bytes() == before and not out.exists()
    assert main(_merge_args(args, out, "--method", "rebasin", flag, str(out))) == 2
    assert "are the same file" in capsys.readouterr().err and not out.exists()


def test_an_unwritable_plot_path_fails_before_any_file_is_written(tmp_path, files, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(_merge_args(files, out, "--method", "rebasin", "--plot", str(tmp_path / "nodir" / "p.png"))) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plot_and_report_are_written_with_the_model(tmp_path, files, capsys):
    pytest.importorskip("matplotlib")
    out, report, plot = tmp_path / "m.safetensors", tmp_path / "m.json", tmp_path / "m.png"
    assert main(_merge_args(files, out, "--method", "rebasin", "--budget", "1.5", "--report", str(report),
                            "--plot", str(plot))) == 0
    assert out.exists() and report.exists() and plot.read_bytes()[:4] == b"\x89PNG"


def test_methods_command_lists_options(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "pleas (1x and up)" in text and "ridge = 0.01" in text and "zipit" in text


def test_default_method_is_pleas(tmp_path, files, capsys):
    out = tmp_path / "m.safetensors"
    code = main(_merge_args(files, out))
    if "pleas" in METHODS:
        assert code == 0 and "method   pleas" in capsys.readouterr().out and out.exists()
    else:
        assert code == 2 and "unknown method 'pleas'" in capsys.readouterr().err and not out.exists()


def test_console_exit_code_on_error(tmp_path):
    out = tmp_path / "m.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "pleas", "merge", str(tmp_path / "missing.pt"), str(tmp_path / "missing.pt"),
         "--arch", "pleas:resnet20", "--data", "digits", "--method", "rebasin", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("pleas: error: checkpoint") and "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []
