"""The command line is a thin layer over the library."""
import json
import subprocess
import sys

import pytest

from pleas.cli import main


def test_spec_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = main(["spec", "pleas:resnet20", "--kwargs", '{"in_channels": 3, "num_classes": 10}',
                 "--input-shape", "2,3,16,16", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("PermutationSpec:") and "width=16" in text
    assert json.loads(out.read_text())["format"] == "pleas.spec/2"


def test_spec_command_on_torchvision_model(capsys):
    pytest.importorskip("torchvision")
    assert main(["spec", "torchvision:resnet18", "--input-shape", "2,3,32,32"]) == 0
    assert "PermutationSpec: 12 groups" in capsys.readouterr().out


def test_unknown_architecture_is_a_clean_error(capsys):
    assert main(["spec", "no_such_net"]) == 2
    assert "unknown architecture 'no_such_net'" in capsys.readouterr().err


def test_bad_input_shape_is_rejected():
    with pytest.raises(SystemExit):
        main(["spec", "resnet18", "--input-shape", "a,b"])


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "pleas", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "spec" in result.stdout
