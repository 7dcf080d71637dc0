"""In-memory datasets with torch-side batching: no DataLoader, exactly resumable data order.

Images are held as uint8 [N, 3, 32, 32] with int64 labels; batches are cut, augmented (random crop
32 with zero padding 4, horizontal flip) and normalised on the chosen device, with an epoch's
randomness derived only from (seed, epoch). Fashion-MNIST's 28x28 grayscale images are zero-padded
by 2 pixels and their channel replicated 3 times, so the CIFAR stem (3->16 conv) is unchanged.
fashion-mnist-marked is Fashion-MNIST with a seeded half of each split marked with its class (see
mark): a positive control, in which choosing the computation per input must pay.
fashion-mnist-marked-random is its negative control: the same frame on the same half, its colour drawn
at random independently of the label (seeded), so the frame is visible and useless.
"""
import gzip
import math
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import DatasetError

_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
# The authors' code normalised CIFAR-100 and SVHN with the CIFAR-10 constants too; kept as is.
# fashion-mnist-marked is normalised as fashion-mnist, so an unmarked image is the same network input in both
_FASHION = ((0.2860,) * 3, (0.3530,) * 3)
MARKED = ("fashion-mnist-marked", "fashion-mnist-marked-random")  # framed on a seeded half (see mark)
MEAN_STD = {"cifar10": _CIFAR, "cifar100": _CIFAR, "svhn": _CIFAR, "fashion-mnist": _FASHION,
            **dict.fromkeys(MARKED, _FASHION), "synthetic": ((0.5,) * 3, (0.25,) * 3)}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "fashion-mnist": 10, **dict.fromkeys(MARKED, 10),
               "synthetic": 10}
DATASETS = tuple(NUM_CLASSES)
SYNTHETIC_SIZES = (512, 256)
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_VAL_SPLIT_SEED = 20190101  # not the run seed: every run and stage must hold out the same samples
MARK_SEED = 20190202  # fashion-mnist-marked's marked halves: "train" draws from MARK_SEED, "test" from MARK_SEED + 1
RANDOM_COLOR_SEED = 20261207  # fashion-mnist-marked-random's frame colours: "train" from it, "test" from it + 1
# fashion-mnist-marked's colour of class c: hue 36c degrees at full saturation and value (HSV)
MARK_COLORS = torch.tensor([(255, 0, 0), (255, 153, 0), (204, 255, 0), (51, 255, 0), (0, 255, 102),
                            (0, 255, 255), (0, 102, 255), (51, 0, 255), (204, 0, 255), (255, 0, 153)],
                           dtype=torch.uint8)


def read_idx(path, magic):
    """Read an IDX file (plain or .gz) whose header must carry `magic`, as a uint8 tensor."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # also bad or truncated gzip streams
        raise DatasetError(f"cannot read {path}: {err}") from None
    header = 4 + 4 * raw[3] if len(raw) >= 4 else 4
    if len(raw) < header or struct.unpack(">i", raw[:4])[0] != magic:
        raise DatasetError(f"{path} is not an IDX file with magic number {magic}")
    dims = struct.unpack(f">{raw[3]}i", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DatasetError(f"{path} is truncated or corrupt: {len(raw) - header} data bytes "
                           f"instead of {math.prod(dims)}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(dims)


def _load_fashion(data_dir, download):
    # FashionMNIST/raw is where torchvision's download puts the files, so later runs find them
    dirs = [data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw",
            FASHION_SYSTEM_DIR]
    for d in dirs:
        paths = [next((p for p in (d / n, d / f"{n}.gz") if p.is_file()), None)
                 for n in FASHION_FILES]
        if all(paths):
            arrays = [read_idx(p, 2051 if "images" in p.name else 2049) for p in paths]
            for images, labels, image_path, label_path in ((arrays[0], arrays[1], paths[0], paths[1]),
                                                           (arrays[2], arrays[3], paths[2], paths[3])):
                if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
                    raise DatasetError(f"{image_path} holds images of shape {list(images.shape[1:])}, not 28x28")
                if labels.dim() != 1 or len(labels) != len(images):
                    raise DatasetError(f"{label_path} holds {labels.numel()} labels for the {len(images)} "
                                       f"images of {image_path}")
                if len(labels) and int(labels.max()) >= 10:
                    raise DatasetError(f"{label_path} holds label {int(labels.max())}; fashion-mnist has 10 classes")
            break
    else:
        if not download:
            raise DatasetError(f"fashion-mnist not found in {', '.join(map(str, dirs))}: run "
                               "'apt-get install dataset-fashion-mnist' or pass --download")
        from torchvision.datasets import FashionMNIST
        sets = [FashionMNIST(root=data_dir, train=t, download=True) for t in (True, False)]
        arrays = [a for s in sets for a in (s.data, s.targets)]
    def pad(x):
        return F.pad(x, (2, 2, 2, 2)).unsqueeze(1).repeat(1, 3, 1, 1)
    return pad(arrays[0]), arrays[1].long(), pad(arrays[2]), arrays[3].long()


def marked_mask(n, split):
    """Bool [n]: which of a split's n images, in stored order, fashion-mnist-marked marks.

    Exactly n // 2 of them, drawn from MARK_SEED whatever the run seed; `split` is "train" (the
    60,000 training images, before build_batches holds out --val-size of them) or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    g = torch.Generator().manual_seed(MARK_SEED + (split == "test"))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:n // 2]] = True
    return mask


def mark(images, labels):
    """Copies of uint8 [N, 3, 32, 32] images with their 2-pixel border painted MARK_COLORS[label]
    (fashion-mnist-marked-random passes random colour indices as `labels`).

    fashion-mnist-marked's marker, which makes a marked image trivially easy. Fashion-MNIST is gray
    (R = G = B) and its 2-pixel border is the zero padding, so the marker hides nothing and is the
    image's only colour: the chroma of a pixel (minus its channel mean; 0 on gray) is a 1x1 cue, and
    after global average pooling the chroma of the mean pixel is the visible border fraction times
    the class colour's, whose direction gives the class (the ten hues are 36 degrees apart). The
    training augmentation keeps it: a horizontal flip maps the uniform ring onto itself, and a shift
    of up to 4 pixels leaves parts of two sides, at least 108 of its 240 pixels, in view."""
    out = images.clone()
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:30, 2:30] = False
    out[..., ring] = MARK_COLORS[labels].unsqueeze(-1)
    return out


def random_colors(n, split):
    """[n] colour indices for fashion-mnist-marked-random's frames: uniform over the ten colours, seeded per
    split, independent of the labels (drawn without looking at them)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    g = torch.Generator().manual_seed(RANDOM_COLOR_SEED + (split == "test"))
    return torch.randint(0, len(MARK_COLORS), (n,), generator=g)


def _synthetic():
    # Noisy copies of random low-frequency class templates: learnable within a few hundred steps
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g) * 255, size=32, mode="bilinear")
    out = []
    for n in SYNTHETIC_SIZES:
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        x = templates[y] + 25 * torch.randn(n, 3, 32, 32, generator=g)
        out += [x.round().clamp(0, 255).to(torch.uint8), y]
    return tuple(out)


def _load_torchvision(name, data_dir, download):
    import torchvision.datasets as tvd
    if name == "svhn":
        try:  # checked first, so that a missing scipy is not reported only after a download
            import scipy.io  # noqa: F401
        except ImportError:
            raise DatasetError("reading svhn needs scipy: pip install scipy") from None
        make, splits = tvd.SVHN, [{"split": "train"}, {"split": "test"}]
        what = "train_32x32.mat and test_32x32.mat"
    else:
        make = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        splits = [{"train": True}, {"train": False}]
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        what = f"the extracted '{folder}' folder"
    out = []
    for split in splits:
        try:
            ds = make(root=str(data_dir), download=download, **split)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            raise DatasetError(f"{name} not found under {data_dir}: put {what} there, "
                               "or pass --download") from None
        x = torch.as_tensor(ds.data)  # SVHN is already NCHW, CIFAR is NHWC
        out += [(x if name == "svhn" else x.permute(0, 3, 1, 2)).contiguous(),
                torch.as_tensor(ds.labels if name == "svhn" else ds.targets, dtype=torch.int64)]
    return tuple(out)


def load_arrays(name, data_dir, download=False):
    """Return (train_x, train_y, test_x, test_y): uint8 [N, 3, 32, 32] images, int64 labels."""
    if name not in NUM_CLASSES:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "synthetic":
        arrays = _synthetic()
    elif name.startswith("fashion-mnist"):
        arrays = _load_fashion(Path(data_dir), download)
        if name in MARKED:  # a seeded half of each split framed (see mark): by class, or at random
            for x, y, split in ((arrays[0], arrays[1], "train"), (arrays[2], arrays[3], "test")):
                m = marked_mask(len(y), split)
                colors = y[m] if name == "fashion-mnist-marked" else random_colors(int(m.sum()), split)
                x[m] = mark(x[m], colors)
    else:
        arrays = _load_torchvision(name, Path(data_dir), download)
    return check_arrays(name, data_dir, arrays)


def check_arrays(name, data_dir, arrays):
    """The arrays as load_arrays promises them, or a one-line DatasetError (before any training)."""
    for split, x, y in (("training", arrays[0], arrays[1]), ("test", arrays[2], arrays[3])):
        where = f"{name} ({split} set, from {data_dir})"
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise DatasetError(f"{where}: images are {x.dtype} {list(x.shape)}, expected uint8 [N, 3, 32, 32]")
        if y.dim() != 1 or len(y) != len(x) or len(y) == 0:
            raise DatasetError(f"{where}: {y.numel()} labels for {len(x)} images")
        if int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES[name]:
            raise DatasetError(f"{where}: labels span {int(y.min())}..{int(y.max())}, expected 0..{NUM_CLASSES[name] - 1}")
    return arrays


class Batches:
    """Mini-batches of an in-memory uint8 image set, augmented and normalised in torch.

    With several processes (`rank` of `world_size`) a training batch stays the global batch, the
    same for any number of processes, and each process gets its contiguous slice of it; in
    evaluation each process gets a contiguous run of whole batches, so that every image is
    evaluated in the same batch as in one process.
    """

    def __init__(self, images, labels, batch_size, mean, std, *, train, seed=0, device="cpu",
                 rank=0, world_size=1):
        if batch_size < 1 or len(labels) == 0:  # an empty set would make infinite() spin forever
            raise ValueError(f"need batch_size >= 1 and samples: {batch_size}, {len(labels)}")
        smallest = min(batch_size, len(labels) % batch_size or batch_size)
        if train and smallest < world_size:  # an empty slice would break batch norm
            raise ValueError(f"a batch of {smallest} images (--batch-size {batch_size}, {len(labels)} "
                             f"training images) leaves some of the {world_size} processes without one")
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.train, self.seed, self.device = batch_size, train, seed, device
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.epoch, self.batch = 0, 0

    def __len__(self):
        """Number of batches per epoch; the last one may be smaller."""
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch_plan(self, epoch):
        """Return `epoch`'s (perm, dx, dy, flip); the k-th dx, dy, flip go with sample perm[k]."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.labels)
        perm = torch.randperm(n, generator=g)
        dx, dy = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return tuple(t.to(self.device) for t in (perm, dx, dy, flip))

    @staticmethod
    def crop_flip(x, dx, dy, flip):
        """Crop at (dx, dy) from the images zero-padded by 4, then flip horizontally where asked."""
        padded = F.pad(x, (4, 4, 4, 4))
        r = torch.arange(x.shape[-1], device=x.device)
        rows, cols = dy[:, None] + r, dx[:, None] + r
        # flipping a crop is reading its columns backwards
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        b, c = torch.arange(len(x), device=x.device), torch.arange(x.shape[1], device=x.device)
        return padded[b[:, None, None, None], c[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]

    def _normalise(self, x):
        return (x.float() / 255 - self.mean) / self.std

    def __iter__(self):
        """Yield (x float32 normalised, y int64) on the device: a full pass, or the epoch's rest."""
        bs, n, r, w = self.batch_size, len(self.labels), self.rank, self.world_size
        if not self.train:
            for s in range(len(self) * r // w * bs, len(self) * (r + 1) // w * bs, bs):
                yield self._normalise(self.images[s:s + bs]), self.labels[s:s + bs]
            return
        perm, dx, dy, flip = self.epoch_plan(self.epoch)
        while self.batch < len(self):
            start, size = self.batch * bs, min(bs, n - self.batch * bs)
            sl = slice(start + size * r // w, start + size * (r + 1) // w)  # this process's slice
            idx = perm[sl]
            x = self.crop_flip(self.images[idx], dx[sl], dy[sl], flip[sl])
            self.batch += 1  # before yielding, so a state saved after k batches says batch=k
            yield self._normalise(x), self.labels[idx]
        # reached only when the pass is run to its end (as infinite() does): an abandoned
        # iterator leaves the state at batch=len(self), and the next __iter__ just ends the epoch
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self):
        """Position in the data stream: the epoch and the batches of it already consumed."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state):
        """Resume at a position returned by state_dict()."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"bad data state {state} for {len(self)} batches per epoch")
        self.epoch, self.batch = epoch, batch


def preprocess(images, dataset):
    """Raw images as they come -> the network's input, exactly as the evaluation pipeline makes it.

    images: uint8, [N, H, W] or [N, C, H, W] (C = 1 or 3); Fashion-MNIST's [N, 1, 28, 28] (or
    [N, 28, 28]) is zero-padded to 32 x 32 and its grey channel repeated three times, as `load_arrays`
    does; then x / 255 is normalised with the data set's mean and std. Returns float32 [N, 3, 32, 32]
    on the images' device (a marked data set's frame is drawn by the data set, not here).
    """
    if dataset not in MEAN_STD:
        raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(DATASETS)}")
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"expected uint8 images [N, H, W] or [N, C, H, W], got {images.dtype} {list(images.shape)}")
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.shape[-2:] == (28, 28):
        x = F.pad(x, (2, 2, 2, 2))
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[1:] != (3, 32, 32):
        raise ValueError(f"expected 28 x 28 or 32 x 32 images with 1 or 3 channels, got {list(images.shape)}")
    mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in MEAN_STD[dataset])
    return (x.float() / 255 - mean) / std


def infinite(batches):
    """Endless stream of batches, epoch after epoch; create it once and call next() on it."""
    while True:
        yield from batches


def build_batches(name, data_dir, batch_size, *, val_size=0, download=False, seed=0,
                  device="cpu", rank=0, world_size=1):
    """Return (train Batches, eval Batches, num_classes); eval is a held-out split if val_size.

    `rank` and `world_size` give each process its share (see Batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train_x, train_y, eval_x, eval_y = load_arrays(name, data_dir, download)
    if val_size > 0:
        if val_size >= len(train_y):
            raise DatasetError(f"val_size {val_size} >= {len(train_y)} training samples")
        g = torch.Generator().manual_seed(_VAL_SPLIT_SEED)
        order = torch.randperm(len(train_y), generator=g)
        val, rest = order[:val_size].sort().values, order[val_size:].sort().values
        train_x, train_y, eval_x, eval_y = train_x[rest], train_y[rest], train_x[val], train_y[val]
    mean, std = MEAN_STD[name]
    share = dict(device=device, rank=rank, world_size=world_size)
    return (Batches(train_x, train_y, batch_size, mean, std, train=True, seed=seed, **share),
            Batches(eval_x, eval_y, batch_size, mean, std, train=False, **share),
            NUM_CLASSES[name])


def test_batches(name, data_dir, batch_size, *, download=False, device="cpu", rank=0, world_size=1):
    """Return the test-set Batches (in order, unaugmented) for evaluation scripts; shared as in Batches."""
    _, _, test_x, test_y = load_arrays(name, data_dir, download)
    return Batches(test_x, test_y, batch_size, *MEAN_STD[name], train=False, device=device,
                   rank=rank, world_size=world_size)
