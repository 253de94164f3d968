"""plumbing/cli.py: the value types (each a number or path checked, or one line saying what is allowed), the
flags that only fail together, the checks before any training, and the sampling flags sample.py and fid.py
share. Every flag of every script given bad values: test_cli_fuzz.py."""
import argparse
import math
import re
from dataclasses import replace

import pytest
import torch

import fid
import sample
import train
from conftest import TINY, run_script
from plumbing.cli import (check_run, noise_interval, per_species, positive_int, positive_int_list, sampling_steps,
                          size_multiple)
from unet import SIZES, UNet, UNetConfig


def test_value_types_turn_text_into_values():
    assert positive_int("8") == 8 and sampling_steps("1000") == 1000 and per_species("pairs:64/4") == "pairs:64/4"
    assert positive_int_list("200,200,600") == "200,200,600"  # kept as text: the checkpoint records it so
    for bad, check in [("1001", sampling_steps), ("0", positive_int), ("1,,2", positive_int_list)]:
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be .*\(got '?{re.escape(bad)}'?[):]"):
            check(bad)


def test_sample_and_fid_share_the_sampling_flags_and_their_defaults():
    """One definition (add_sampling_flags): DPM-Solver++ in 15 steps, as the stage grids draw."""
    for parser in (sample.build_parser(), fid.build_parser()):
        assert [parser.get_default(k) for k in ("sampler", "steps", "guide_from")] == ["dpm++", 15, "null"]
    assert (TINY.grid_sampler, train.TrainConfig().grid_steps) == ("dpm++", 15)


@pytest.mark.parametrize("argv,message", [
    (["--image-size", "7"], "argument --image-size: must be a multiple of 4 for --size small (got 7)"),
    (["--size", "base", "--image-size", "36"], "argument --image-size: must be a multiple of 8 for --size base"),
    (["--level", "class", "--first-level", "order"], "argument --level: must not be coarser than --first-level"),
    (["--p-uncond", "0.5", "--p-cut", "0.7"], "argument --p-cut: must be at most 0.5 beside --p-uncond 0.5"),
    (["--latent", "--image-size", "48", "--latent-f", "8"],
     "argument --image-size: must be a multiple of 32 for --latent-f 8 and --size small (got 48)"),
    (["--latent", "--ae-crop", "30"], "argument --ae-crop: must be a multiple of --latent-f 4 (got 30)"),
])
def test_flags_that_only_fail_together(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.parse_args(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit.value.code == 2 and ": error: " in last and message in last
    assert train.parse_args(["--size", "base", "--image-size", "64"]).image_size == 64


def test_image_size_multiple_is_what_the_unet_needs():
    """size_multiple agrees with unet.UNet: a multiple runs through it, a size that is not fails deep inside."""
    assert {size: size_multiple(size) for size in SIZES} == {"tiny": 4, "small": 4, "base": 8}
    net = UNet(UNetConfig(**SIZES["tiny"]))
    ctx = torch.zeros(1, 8, net.cfg.context_dim)
    assert net(torch.zeros(1, 3, 12, 12), torch.tensor([1]), ctx).shape == (1, 3, 12, 12)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        net(torch.zeros(1, 3, 10, 10), torch.tensor([1]), ctx)


def test_bad_stage_steps_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage-steps", "300,x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1  # that line alone, "<prog>: error: ..."
    assert err.endswith(": error: argument --stage-steps: must be comma-separated positive integers, e.g. "
                        "200,200,600 (got '300,x') (see --help)\n")


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(train, "read_data", None)  # training would need the data first
    with pytest.raises(SystemExit, match=r"^error: cannot write to --out .*/file/out: "):
        train.main(replace(TINY, out=str(tmp_path / "file" / "out")))


def test_amp_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --amp is bf16 autocast for CUDA"):
        train.main(replace(TINY, amp=True, out=str(tmp_path)))


def test_an_autoencoder_batch_that_does_not_split_over_processes_is_an_error(tmp_path):
    cfg = train.parse_args(["--latent", "--ae-batch-size", "16", "--batch-size", "30", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: --ae-batch-size 16 does not split evenly over 3 processes$"):
        check_run(cfg, world=3)
    check_run(cfg, world=2)  # 16 = 2 x 8


# -----------------------------------------------------------------------------
# --guidance-interval's values


@pytest.mark.parametrize("text, value", [("0.28,5.42", (0.28, 5.42)), ("0,inf", (0.0, math.inf)), ("", None)])
def test_interval_flag_values(text, value):
    assert noise_interval(text) == value


@pytest.mark.parametrize("text", ["5,1", "-1,2", "1", "a,b", "1,2,3"])
def test_interval_flag_refuses_bad_values_in_one_line(text):
    proc = run_script("sample.py", "--guidance-interval", text)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--guidance-interval" in proc.stderr
