"""Bad checkpoints and a full disk end in one line that names the file and what is wrong (model.py)."""
import errno
import os
import zipfile
from collections import OrderedDict
from dataclasses import asdict

import pytest
import torch

import model
from model import DiffusionConfig
from plumbing.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from unet import SIZES, UNetConfig

TINY = asdict(UNetConfig(**SIZES["tiny"]))


def plain_checkpoint(**extra):
    return {"ema": {"w": torch.zeros(3)}, "unet_config": TINY, "diffusion_config": asdict(DiffusionConfig()),
            "vocab_sizes": [2, 3], "lineages": [["Animalia", "Chordata"]], "step": 7, **extra}


class Lineage:  # a class in a checkpoint: unpickling it would run code from the file
    pass


def bad_files(folder):
    """{what is wrong: (path, what the one line must say)}, each file as it would be found on a disk."""
    good = folder / "good.pt"
    torch.save(plain_checkpoint(), good)
    data = good.read_bytes()
    cases = {"missing": (folder / "nope.pt", "not found: train one first")}
    (folder / "cut.pt").write_bytes(data[:len(data) // 2])
    cases["truncated"] = (folder / "cut.pt", "is truncated")
    (folder / "notes.pt").write_text("these are not weights")
    cases["not a zip"] = (folder / "notes.pt", "is not a checkpoint (not a zip archive")
    (folder / "empty.pt").write_bytes(b"")
    cases["empty"] = (folder / "empty.pt", "is not a checkpoint (an empty file")
    with zipfile.ZipFile(folder / "photos.pt", "w") as z:
        z.writestr("a.txt", "hello")
    cases["another zip"] = (folder / "photos.pt", "a zip archive, but not one torch.save wrote")
    torch.save({"weight": torch.zeros(2)}, folder / "bare.pt")
    cases["a bare state dict"] = (folder / "bare.pt", "is not a checkpoint of train.py: it holds no ema")
    torch.save(plain_checkpoint(lineages=OrderedDict(), classes=[Lineage]), folder / "code.pt")
    cases["python objects"] = (folder / "code.pt", "holds pickled Python objects, and only plain-data checkpoints "
                                                   "are opened")
    garbled = bytearray(data)  # a flipped byte inside the pickled record (torch.load checks no CRC)
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    garbled[info.header_offset + 30 + len(info.filename) + len(info.extra) + 40] ^= 0x5A  # 30: the local header
    (folder / "garbled.pt").write_bytes(garbled)
    cases["damaged"] = (folder / "garbled.pt", "is damaged (its pickled data is garbled)")
    old = plain_checkpoint(unet_config={**TINY, "latent_scale": 0.18})
    del old["lineages"]
    torch.save(old, folder / "old.pt")
    cases["another version"] = (folder / "old.pt", "was written by another version of train.py "
                                                   "(no lineages, unet_config latent_scale, unknown here)")
    cases["a folder"] = (folder, "cannot be read as a checkpoint (Is a directory)")
    return cases


def test_every_bad_checkpoint_is_one_line_naming_the_file_and_why(tmp_path):
    for what, (path, message) in bad_files(tmp_path).items():
        with pytest.raises((CheckpointError, FileNotFoundError)) as err:
            read_checkpoint(str(path))
        text = str(err.value)
        assert text.startswith(str(path)) or f"checkpoint {path} " in text, what
        assert message in text and "\n" not in text, (what, text)
    assert read_checkpoint(str(tmp_path / "good.pt"))["step"] == 7
    with pytest.raises(CheckpointError, match="is truncated"):  # load_checkpoint (sample.py, fid.py) reads so too
        model.load_checkpoint(str(tmp_path / "cut.pt"))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_keeps_the_old_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch, where):
    """ENOSPC, injected where a real disk reports it (a write, or the fsync that flushes delayed writes)."""
    path = tmp_path / "class.last.pt"
    save_checkpoint(str(path), **plain_checkpoint(step=200))
    before = path.read_bytes()

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "fsync":
        monkeypatch.setattr(model.os, "fsync", no_space)
    else:
        real_open = open

        class HalfWrite:  # writes half of what it is given, then finds the disk full
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(bytes(data[:len(data) // 2]))
                no_space()

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()
        monkeypatch.setattr(model, "open", lambda *a, **k: HalfWrite(real_open(*a, **k)), raising=False)
    big = plain_checkpoint(ema={"w": torch.zeros(250_000)}, step=400)  # 1 MB of weights
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(str(path), **big)
    message = str(err.value)
    assert message.startswith(f"no space left in {tmp_path} to write {path}: it needs 1.0 MB and ")
    assert message.endswith(f"MB are free; the previous {path} (step 200) is intact") and "\n" not in message
    assert not (tmp_path / "class.last.pt.tmp").exists()
    assert path.read_bytes() == before
    monkeypatch.undo()
    monkeypatch.setattr(model.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=r"no earlier \S*species.pt exists"):  # nothing to keep
        save_checkpoint(str(tmp_path / "species.pt"), **big)
    assert os.listdir(tmp_path) == ["class.last.pt"]


def test_other_write_errors_also_remove_the_tmp_file(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(model.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):  # not a full disk: the error as it came
        save_checkpoint(str(tmp_path / "a.pt"), **plain_checkpoint())
    assert os.listdir(tmp_path) == []


def test_a_run_that_fills_the_disk_stops_with_its_last_checkpoint_whole(tmp_path, monkeypatch):
    """train.py end to end: the second save of a stage finds the disk full; step 1's checkpoint stays."""
    import train
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the file and the folder of the first save, then the second save's file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(model.os, "fsync", fsync)
    cfg = train.TrainConfig(level="class", size="tiny", image_size=16, per_species=2, batch_size=8, steps=2,
                            save_every=1, grid_cols=2, grid_steps=2, device="cpu", out=str(tmp_path))
    with pytest.raises(SystemExit, match=rf"^error: no space left in {tmp_path} to write {tmp_path}/class.last.pt: "
                                         rf"it needs \d+\.\d MB and .* MB are free; the previous "
                                         rf"{tmp_path}/class.last.pt \(step 1\) is intact$"):
        train.main(cfg)  # one line, exit status 1
    assert sorted(os.listdir(tmp_path)) == ["class.last.pt", "train.log"]
    assert read_checkpoint(str(tmp_path / "class.last.pt"))["step"] == 1


def test_data_that_names_nothing_down_to_the_level_is_one_line(tmp_path):
    """Folders that start at family, and the default --level order: no stage could condition on anything."""
    import train
    from fixtures import save, species, toy_image
    for s, lineage, traits in species()[:2]:
        for k in range(2):
            save(toy_image(s, traits, k), tmp_path.joinpath("data", *lineage[4:], f"{k}.png"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "class.pt").write_bytes(b"earlier work")
    cfg = train.TrainConfig(data=str(tmp_path / "data"), top_rank="family", workers=0, out=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/data names no class to order \(its coarsest rank is "
                                         r"family\): train with --level family or finer$"):
        train.main(cfg)
    assert (tmp_path / "out" / "class.pt").read_bytes() == b"earlier work"


def test_ranks_without_a_stage_are_named_before_training(tmp_path, capsys):
    """One genus of one species: the ranks --level asks for get no stage, and train.py says why first."""
    import train
    from fixtures import save, species, toy_image
    s, lineage, traits = species()[0]  # Animalia/Chordata/Aves/Passeriformes/Corvidae/Corvus/Corvus corax
    for k in range(4):  # folders down to the genus: the data names no species
        save(toy_image(s, traits, k), tmp_path.joinpath("data", *lineage[2:6], f"{k}.png"))
    cfg = train.TrainConfig(level="species", data=str(tmp_path / "data"), top_rank="class", workers=0,
                            out=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="has 4 images, fewer than --batch-size 32"):  # stops before training
        train.main(cfg)
    assert ("note: no stage for order, family, genus (no more taxa in the data than a coarser rank: nothing new "
            "to split), species (the data names none); training class\n") in capsys.readouterr().out
