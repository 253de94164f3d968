"""plumbing/checkpoints.py: the atomic write and a full disk, opening or refusing a file in one line, the one
checker that decides whether a checkpoint may continue a run, and taxa matched by name."""
import errno
import os
import zipfile
from collections import OrderedDict
from dataclasses import asdict, replace

import pytest
import torch
from PIL import Image

import train
from conftest import TINY, TINY_AUTOENCODER, TINY_UNET, VOCAB, randomize
from model import DiffusionConfig, TaxaDiffusion
from plumbing import checkpoints
from plumbing.checkpoints import (CheckpointError, build_model, by_name, load_checkpoint, read_checkpoint,
                                  save_checkpoint, weights_hash)
from taxonomy import Taxonomy
from unet import SIZES, Autoencoder, UNetConfig

TINY_UNET_DICT = asdict(TINY_UNET)
pytestmark = pytest.mark.usefixtures("one_thread")


def plain_checkpoint(**extra):
    return {"ema": {"w": torch.zeros(3)}, "unet_config": TINY_UNET_DICT, "diffusion_config": asdict(DiffusionConfig()),
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
    old = plain_checkpoint(unet_config={**TINY_UNET_DICT, "latent_scale": 0.18})
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
        load_checkpoint(str(tmp_path / "cut.pt"))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_keeps_the_old_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch, where):
    """ENOSPC, injected where a real disk reports it (a write, or the fsync that flushes delayed writes)."""
    path = tmp_path / "class.last.pt"
    save_checkpoint(str(path), **plain_checkpoint(step=200))
    before = path.read_bytes()

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "fsync":
        monkeypatch.setattr(checkpoints.os, "fsync", no_space)
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
        monkeypatch.setattr(checkpoints, "open", lambda *a, **k: HalfWrite(real_open(*a, **k)), raising=False)
    big = plain_checkpoint(ema={"w": torch.zeros(250_000)}, step=400)  # 1 MB of weights
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(str(path), **big)
    message = str(err.value)
    assert message.startswith(f"no space left in {tmp_path} to write {path}: it needs 1.0 MB and ")
    assert message.endswith(f"MB are free; the previous {path} (step 200) is intact") and "\n" not in message
    assert not (tmp_path / "class.last.pt.tmp").exists()
    assert path.read_bytes() == before
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints.os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=r"no earlier \S*species.pt exists"):  # nothing to keep
        save_checkpoint(str(tmp_path / "species.pt"), **big)
    assert os.listdir(tmp_path) == ["class.last.pt"]


def test_other_write_errors_also_remove_the_tmp_file(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(checkpoints.os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"):  # not a full disk: the error as it came
        save_checkpoint(str(tmp_path / "a.pt"), **plain_checkpoint())
    assert os.listdir(tmp_path) == []


def test_a_run_that_fills_the_disk_stops_with_its_last_checkpoint_whole(tmp_path, monkeypatch):
    """train.py end to end: the second save of a stage finds the disk full; step 1's checkpoint stays."""
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the file and the folder of the first save, then the second save's file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoints.os, "fsync", fsync)
    cfg = replace(TINY, steps=2, save_every=1, out=str(tmp_path))
    with pytest.raises(SystemExit, match=rf"^error: no space left in {tmp_path} to write {tmp_path}/class.last.pt: "
                                         rf"it needs \d+\.\d MB and .* MB are free; the previous "
                                         rf"{tmp_path}/class.last.pt \(step 1\) is intact$"):
        train.main(cfg)  # one line, exit status 1
    assert sorted(os.listdir(tmp_path)) == ["class.last.pt", "train.log"]
    assert read_checkpoint(str(tmp_path / "class.last.pt"))["step"] == 1


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = randomize(TaxaDiffusion(TINY_UNET, VOCAB))
    path = tmp_path / "genus.pt"
    save_checkpoint(path, model=model.state_dict(), ema=model.state_dict(), unet_config=TINY_UNET_DICT,
                    vocab_sizes=VOCAB, lineages=[["Animalia", None, "Aves"]], level="genus")
    assert not (tmp_path / "genus.pt.tmp").exists()
    loaded, ckpt = load_checkpoint(path)  # uses torch.load(weights_only=True)
    assert ckpt["level"] == "genus" and isinstance(build_model(ckpt), TaxaDiffusion)
    # weights of another network (here: another width) end in one line that names the file and what to do
    other = TaxaDiffusion(UNetConfig(**{**SIZES["tiny"], "base_channels": 8}), VOCAB)
    save_checkpoint(path, model=other.state_dict(), ema=other.state_dict(), unet_config=TINY_UNET_DICT,
                    vocab_sizes=VOCAB, lineages=[["Animalia", None, "Aves"]], level="genus")
    with pytest.raises(ValueError, match=r"genus.pt: its weights do not fit this version of the network "
                                         r"\(size mismatch for .*\); train it again"):
        load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_weights_hash_names_the_weights_not_the_layout():
    ae = Autoencoder(TINY_AUTOENCODER)
    h = weights_hash(ae.state_dict())
    assert weights_hash(ae.to(memory_format=torch.channels_last).state_dict()) == h
    with torch.no_grad():
        ae.scale.fill_(0.5)
    assert weights_hash(ae.state_dict()) != h


def test_a_checkpoint_that_does_not_fit_this_run_is_one_line(tmp_path):
    out = tmp_path / "out"
    train.main(replace(TINY, steps=2, out=str(out)))
    runs = {"image size": (replace(TINY, steps=2, level="order", image_size=8),
                           "trained with --image-size 16, this run has --image-size 8"),
            "network": (replace(TINY, steps=2, level="order", size="small"),
                        "trained with --size tiny, this run has --size small")}
    # a finished stage is reused only by a run that would have trained it alike (an ablation into an old --out)
    for flag, value, shown in (("schedule", "all", "all"), ("seed", 1, 1), ("lr", 2e-3, 0.002), ("steps", 3, 3),
                               ("loss_weight", "eps", "eps"), ("p_cut", 0.0, 0.0)):
        name = "--" + flag.replace("_", "-")
        runs[flag] = (replace(replace(TINY, steps=2), **{flag: value}),  # out/class.pt is this run's whole result
                      f"class.pt was trained with {name} {getattr(replace(TINY, steps=2), flag)}, this run has "
                      f"{name} {shown}")
    # the default --noise-schedule auto was recorded as what it meant in pixels, Ho's linear betas
    runs["noise schedule"] = (replace(TINY, steps=2, noise_schedule="scaled-linear"),
                              "class.pt was trained with --noise-schedule linear, this run has --noise-schedule "
                              "scaled-linear")
    # another taxonomy: a folder tree of two species not in the toy tree
    for species in ["Felis catus", "Felis silvestris"]:
        folder = tmp_path / "tree" / "Mammalia" / "Carnivora" / "Felidae" / "Felis" / species
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
    runs["taxonomy"] = (replace(TINY, level="order", data=str(tmp_path / "tree")), "was trained on another taxonomy "
                        "(lineages only in the data: 2 (e.g. 'Mammalia/Carnivora/Felidae/Felis/Felis catus'); "
                        "lineages only in the checkpoint: 48 (e.g. 'Animalia/")
    for what, (cfg, message) in runs.items():
        with pytest.raises(SystemExit) as err:
            train.main(replace(cfg, out=str(out)))
        assert message in str(err.value) and "\n" not in str(err.value), what
        assert str(err.value).endswith(f"use the flags it was trained with, another --out, or delete {out}/class.pt")

    # other ranks
    ckpt = torch.load(out / "class.pt", weights_only=True)
    torch.save({**ckpt, "ranks": ckpt["ranks"][1:]}, out / "class.pt")
    with pytest.raises(SystemExit, match="class.pt has ranks phylum/class/.*/species, this run kingdom/phylum/"):
        train.main(replace(TINY, level="order", out=str(out)))

    # resuming a stage with another flag that changes what it computes
    torch.save({**ckpt, "step": 1}, out / "class.last.pt")
    os.remove(out / "class.pt")
    with pytest.raises(SystemExit, match=r"class.last.pt was trained with --lr 0.001, this run has --lr 0.002;"):
        train.main(replace(TINY, steps=2, lr=2e-3, out=str(out)))

    # written by an older train.py (no --cooldown or --noise-schedule then, no cooldown_steps): refused in one
    # line naming what it lacks, never adapted, and kept
    for old, missing in [("train_config", "cooldown"), ("train_config", "noise_schedule"), (None, "cooldown_steps")]:
        stale = {**ckpt, "step": 1}
        if old:
            stale[old] = {k: v for k, v in ckpt[old].items() if k != missing}
        else:
            del stale[missing]
        torch.save(stale, out / "class.last.pt")
        with pytest.raises(SystemExit) as err:
            train.main(replace(TINY, steps=2, out=str(out)))
        assert str(err.value).startswith(f"error: {out}/class.last.pt ") and "\n" not in str(err.value), missing
        assert missing.replace("_", "-") in str(err.value) or missing in str(err.value), str(err.value)
        assert (out / "class.last.pt").exists()  # refused, not deleted
    os.remove(out / "class.last.pt")
    train.main(replace(TINY, steps=2, out=str(out)))

    # resuming a stage that numbers the taxa in another order: its optimizer state is in its own id order
    ckpt = torch.load(out / "class.pt", weights_only=True)
    vocab = [list(names) for names in ckpt["vocab"]]
    vocab[2] = vocab[2][:1] + vocab[2][1:][::-1]  # the classes listed backwards ("<unknown>" stays id 0)
    torch.save({**ckpt, "step": 1, "vocab": vocab}, out / "class.last.pt")
    os.remove(out / "class.pt")
    with pytest.raises(SystemExit, match=r"^error: \S*class.last.pt numbers the taxa in another order than the data "
                                         r"lists them; delete it to train this stage again$"):
        train.main(replace(TINY, steps=2, out=str(out)))


def test_stage_checkpoints_map_taxa_by_name():
    a = [("Animalia", None, "Aves", "Passeriformes", None, None, None),
         ("Animalia", None, "Aves", "Strigiformes", None, None, None),
         ("Animalia", None, "Insecta", None, None, None, None)]
    ours, theirs = Taxonomy(a), Taxonomy(a[::-1])  # the same taxa, listed in another order
    assert ours.vocab[3] != theirs.vocab[3]
    state = {f"conditioner.embed.{r}.weight": torch.arange(len(v)).float()[:, None] for r, v in enumerate(theirs.vocab)}
    moved = by_name(state, theirs.vocab, ours)
    for r, names in enumerate(ours.vocab):
        for i, name in enumerate(names):  # our row for each name holds the checkpoint's row for that name
            assert moved[f"conditioner.embed.{r}.weight"][i].item() == theirs.vocab[r].index(name)
    # Leaves at two ranks: the data's order of first appearance is not the order its lineages rebuild, which is
    # what sample.py does (Taxonomy(ckpt["lineages"])); train.py numbers taxa in the rebuilt order.
    mixed = [("Animalia", None, "Aves", "Passeriformes", "Paridae", "Parus", "Parus major"),
             ("Animalia", None, "Aves", "Passeriformes", "Paridae", "Poecile", None)]
    as_listed, rebuilt = Taxonomy(mixed), Taxonomy(Taxonomy(mixed).lineages())
    assert as_listed.vocab[5] == ["<unknown>", "Parus", "Poecile"]
    assert rebuilt.vocab[5] == ["<unknown>", "Poecile", "Parus"]
    assert Taxonomy(rebuilt.lineages()).vocab == rebuilt.vocab
