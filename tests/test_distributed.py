"""Statistics summed over a torch.distributed process group (issue #19): two ranks on loopback (gloo),
each with its own run of whole calibration batches, give the one-process merge, and fail together."""
from __future__ import annotations

import time

import pytest
import torch

import distributed_worker as worker
from pleas import distributed
from pleas.cli import main
from pleas.errors import PleasError

# float64 merges: every product runs in float64, each rank sums its own batches' products and the sums meet
# in another order, so the merged weights differ from one process's by float64 round-off (1e-16) amplified
# by the solves (the ridge bounds their condition number by about columns / ridge, below 1e5 here) and by
# the chain of propagated refits: measured 3e-13 relative; 1e-9 leaves room for other CPUs.
RTOL, ATOL = 1e-9, 1e-12
# float32 merges (the CLI): large products run in float32, and a BLAS may sum a row's products in another
# order for another number of rows, so float32 round-off (1e-7) takes float64's place; measured 4e-5
# relative to a tensor's largest entry after the propagated refits.
RTOL32, ATOL32 = 1e-3, 1e-4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    distributed.launch(2, worker.merge_shards, (str(out),))
    return out


@pytest.mark.parametrize("method, budget, options", worker.CASES)
def test_two_ranks_give_the_one_process_merge(two_ranks, method, budget, options):
    one = worker.merge(method, budget, worker.data(), **options)
    want = one.model.state_dict()
    for rank in (0, 1):
        saved = torch.load(two_ranks / f"{worker.label(method, options)}-rank{rank}.pt", weights_only=False)
        got = saved["state"]
        assert got.keys() == want.keys()
        for k, v in want.items():
            if v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=RTOL, atol=ATOL, msg=f"{method} rank {rank}: {k}")
            else:
                assert torch.equal(got[k], v), k  # integer counters
        assert saved["report"]["calibration_samples"] == len(worker.data())
        assert saved["report"]["processes"] == 2
        assert saved["report"]["norm_stats"] == one.report["norm_stats"]


def test_distillation_steps_leave_every_rank_with_the_same_weights(two_ranks):
    saved = [torch.load(two_ranks / f"distill-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert all(s["distill"]["steps"] == 3 and "restored" not in s["distill"] for s in saved)
    assert saved[0]["distill"]["loss_after"] == pytest.approx(saved[1]["distill"]["loss_after"], rel=1e-12)
    for k, v in saved[0]["state"].items():  # the same start and the same averaged gradients on both ranks
        torch.testing.assert_close(saved[1]["state"][k], v, rtol=RTOL, atol=ATOL, msg=k)


def test_shards_are_consecutive_whole_batches():
    x = torch.arange(83)[:, None]
    parts = [distributed.shard(x, 10, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [30, 30, 23]  # 9 batches, 3 each (the last one short)
    assert torch.equal(torch.cat(parts), x)


@pytest.mark.parametrize("fault, says", [("empty", "no samples"), ("models", "differ between ranks")])
def test_a_faulty_rank_fails_every_rank(tmp_path, fault, says):
    with pytest.raises(PleasError, match="rank"):
        distributed.launch(2, worker.faulty, (str(tmp_path), fault))
    errors = {r: (tmp_path / f"error-rank{r}.txt").read_text() for r in (0, 1)}  # both ranks saw it
    assert all(says in e for e in errors.values()), errors
    assert not list(tmp_path.glob("merged-rank*"))


def test_a_rank_that_dies_is_an_error_not_a_hang(tmp_path):
    start = time.perf_counter()
    with pytest.raises(PleasError, match="rank 1 of 2 died"):
        distributed.launch(2, worker.faulty, (str(tmp_path), "dies"))
    assert time.perf_counter() - start < distributed.TIMEOUT.total_seconds()
    assert not list(tmp_path.glob("merged-rank*"))


def test_cli_nproc_writes_the_one_process_model(tmp_path):
    from safetensors.torch import load_file, save_file

    a, b = worker.models()
    paths = {name: str(tmp_path / f"{name}.safetensors") for name in "ab"}
    for name, model in zip("ab", (a, b)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[name])
    torch.save(worker.data(), tmp_path / "calib.pt")
    common = ["merge", paths["a"], paths["b"], "--arch", "toy_models:VGGBN", "--data", str(tmp_path / "calib.pt"),
              "--batch-size", str(worker.BATCH), "--budget", "1.5"]
    assert main([*common, "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main([*common, "--nproc", "2", "--out", str(tmp_path / "two.safetensors")]) == 0
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k].float(), one[k].float(), rtol=RTOL32, atol=ATOL32, msg=k)


def test_cli_nproc_with_too_little_data_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    a, b = worker.models()
    for name, model in zip("ab", (a, b)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    torch.save(worker.data()[: worker.BATCH], tmp_path / "calib.pt")  # one batch for two ranks
    out = tmp_path / "merged.safetensors"
    code = main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--arch", "toy_models:VGGBN",
                 "--data", str(tmp_path / "calib.pt"), "--batch-size", str(worker.BATCH), "--nproc", "2",
                 "--out", str(out)])
    assert code != 0
    err = capsys.readouterr().err
    assert "rank" in err and "failed" in err and "no samples" in err  # either rank may report first
    assert not out.exists()
