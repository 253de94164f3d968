"""Fuzz every command line: each flag of each script, given bad values of its kind, ends in one line.

The flags come from each script's own parser, so a flag added tomorrow is fuzzed tomorrow, and a number
flag added without a checking type fails test_every_flag_has_a_kind. A flag's kind is the type function
argparse calls for it (plumbing/cli.py), or its choices.
The parsers run in-process (catching SystemExit, reading stderr with capsys): hundreds of cases in a
few seconds. Only the cases that need a real run start a process; they are marked "(a real run)".
"""
import importlib.util
import os
import re

import pytest
import torch

import fid
import sample
import train
from conftest import ROOT, run_script
from plumbing.cli import (config_parser, device_name, downsampling_factor, finite_float, fraction, image_path, noise_interval,
                          input_path, nonneg_int, output_path, per_species, positive_float, positive_int,
                          positive_int_list, sampling_steps)


def bench(name):
    path = os.path.join(ROOT, "tests", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {"train.py": train, "sample.py": sample, "fid.py": fid,
           **{f"benchmarks/{n}.py": bench(n) for n in ("attention", "autoencoder", "loader", "paper_claims", "samplers",
                                                         "speed")}}


def build_parser(module):
    """A script's parser: train.py's is made from its TrainConfig, the others build their own."""
    if module is train:
        return config_parser(train.TrainConfig, train.__doc__)
    return module.build_parser()
MISSING = "/nonexistent/taxa-fuzz/file.pt"
UNWRITABLE = "/dev/null/out"  # below a file: no folder can be made there
HUGE = "1" + "0" * 30
BAD = {  # bad values of each kind: zero, negatives, huge, nan, inf, empty, the wrong type
    positive_int: ["0", "-4", HUGE, "nan", "inf", "", "1.5", "abc"],
    nonneg_int: ["-1", HUGE, "nan", "", "1.5", "abc"],
    positive_float: ["0", "-1", "nan", "inf", "-inf", "1e400", "", "abc"],
    finite_float: ["nan", "inf", "-inf", "1e400", "", "abc"],
    fraction: ["-0.1", "1.5", "nan", "inf", "", "abc"],
    positive_int_list: ["", "0", "-5", "1,,2", "200,abc", "1.5", HUGE],
    per_species: ["0", "-4", "", "1.5", "abc", "pairs:64", "pairs:64/0", "zipf:0", "zipf:x"],
    input_path: [MISSING],  # '' is the flag left unset
    output_path: ["", UNWRITABLE],
    image_path: ["", UNWRITABLE + ".png", "out/samples", "out/samples.txt", "."],  # no image extension, a folder
    sampling_steps: ["0", "-4", "1001", HUGE, "nan", "", "1.5", "abc"],  # at most T = 1000
    device_name: ["", "gpu", "cuda:99", "cpu:x"],
    downsampling_factor: ["", "0", "3", "16", "4.0", "abc"],
    noise_interval: ["5,1", "-1,2", "1", "a,b", "nan,1", "1,2,3"],  # '' is every step
    "choices": ["", "nope"],
}
GOOD = {  # values each kind must take (train.py --steps 0: use --stage-steps; --seed 0)
    positive_int: ["8"], nonneg_int: ["0", "8"], positive_float: ["1e-4"], finite_float: ["-2.5", "0"],
    fraction: ["0", "0.5"], positive_int_list: ["5", "200,200,600"], per_species: ["4", "pairs:64/4", "zipf:64"],
    input_path: ["", ROOT],
    output_path: ["fresh/sub/folder"], device_name: ["cpu"], downsampling_factor: ["2", "8"],
    image_path: ["fresh/sub/a.png", "b.JPG"], sampling_steps: ["1", "15", "1000"],
    noise_interval: ["", "0.28,5.42", "0,inf"],
}
# read at run time (a missing --data: test_readers.py), or checked with the flags that fail together (--hold-out)
FREE_TEXT = {"--data", "--columns", "--lineage", "--rss-child", "--hold-out", "--tree"}  # --tree: a lineage


def kind(action):
    if action.choices is not None:
        return "choices"
    return action.type if action.type in BAD else None


def flags():
    """(script, name the error uses, action) of every option and positional that takes a value."""
    for script, module in SCRIPTS.items():
        for action in build_parser(module)._actions:
            if action.nargs != 0:  # not --help nor a switch
                yield script, "/".join(action.option_strings) or action.dest, action


def argv_for(action, value):
    """One value for the flag; --flag=value, so '-inf' or '' reach the type function as they are."""
    return [f"{action.option_strings[0]}={value}"] if action.option_strings else [value]


def parse(script, argv):
    module = SCRIPTS[script]
    # fid.py wants an input (see workdir): a checkpoint, or for --save-stats a folder of images
    base = (["."] if argv[0].startswith("--save-stats") else ["x.pt"]) if script == "fid.py" else []
    return getattr(module, "parse_args", lambda a: build_parser(module).parse_args(a))(base + argv)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all cases (a tmp_path per case would cost more than the case): default outputs land
    there, and x.pt is the checkpoint fid.py's parser wants to exist."""
    folder, cwd = tmp_path_factory.mktemp("cli"), os.getcwd()
    (folder / "x.pt").touch()
    os.chdir(folder)
    yield folder
    os.chdir(cwd)


CASES = [(script, name, action, value) for script, name, action in flags() if kind(action)
         for value in BAD[kind(action)]]


def test_every_flag_has_a_help_line():
    """--help says what every option does, not only its default."""
    silent = [f"{script} {name}" for script, module in SCRIPTS.items() for action in build_parser(module)._actions
              for name in ["/".join(action.option_strings) or action.dest] if not action.help]
    assert not silent, f"options without a --help line: {silent}"


def test_every_flag_has_a_kind():
    """A flag that takes a number (or a path) has a checking type: plain int, float or str pass nan, -1 or ''."""
    unchecked = [f"{script} {name}" for script, name, action in flags()
                 if kind(action) is None and not (action.type in (None, str) and name in FREE_TEXT)]
    assert not unchecked, f"flags without a checking type (plumbing/cli.py): {unchecked}"
    assert len(CASES) > 400


@pytest.mark.parametrize("script,name,action,value", CASES,
                         ids=[f"{s} {n}={v!r}" for s, n, _, v in CASES])
def test_bad_value_is_one_line_naming_the_flag(script, name, action, value, capsys, workdir):
    with pytest.raises(SystemExit) as exit:
        parse(script, argv_for(action, value))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exit.value.code == 2 and "Traceback" not in err
    assert re.match(r"\S+: error: argument ", last), last  # "<prog>: error: argument --flag: ..."
    assert len(err.strip().splitlines()) == 1, err  # that line alone: no usage block to bury it
    assert len(re.findall(rf"(?<![\w-]){re.escape(name)}(?![\w-])", last)) == 1, last  # the flag, once
    assert (value or "''") in last, last  # and the value
    assert "must be" in last or "invalid choice" in last, last  # and what is allowed


def test_good_values_pass(workdir):
    for script, name, action in flags():
        for value in GOOD.get(kind(action), []) if action.option_strings else []:  # fid.py's inputs: x.pt
            parse(script, argv_for(action, value))  # no SystemExit
    assert train.parse_args(["--steps", "0", "--seed", "0"]).steps == 0
    assert train.parse_args(["--stage-steps", "200,200,600"]).stage_steps == "200,200,600"  # kept as text


# -----------------------------------------------------------------------------
# (a real run): what the user sees, from a process


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_sample_with_a_truncated_checkpoint(tmp_path):
    """(a real run) sample.py --ckpt <a checkpoint cut in half>."""
    torch.save({"ema": {}, "unet_config": {}, "vocab_sizes": [1], "lineages": [], "w": torch.zeros(1000)},
               tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    proc = run_script("sample.py", "--ckpt", "cut.pt", cwd=tmp_path)
    assert one_error_line(proc) == "error: cut.pt is truncated (the end of its zip archive is missing): copy it " \
                                   "again, or delete it and train it again"
    assert len(proc.stderr.strip().splitlines()) == 1  # nothing else: no usage, no progress bar


def test_train_with_a_truncated_resume_checkpoint(tmp_path):
    """(a real run) train.py finds out/class.last.pt cut short (copied from a machine that was still writing it)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "class.last.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    proc = run_script("train.py", "--size", "tiny", "--steps", "1", "--per-species", "2", "--batch-size", "8",
               "--device", "cpu", cwd=tmp_path)
    assert one_error_line(proc) == "error: out/class.last.pt is truncated (the end of its zip archive is " \
                                   "missing): copy it again, or delete it and train it again"
