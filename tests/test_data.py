import colorsys
import gzip
import re
import struct
import sys
import types

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import data

MEAN, STD = data.MEAN_STD["synthetic"]


def normalise(x_uint8, mean=MEAN, std=STD):
    """Independent reference for Batches' normalisation."""
    return TF.normalize(x_uint8.float() / 255, list(mean), list(std))


def random_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def index_images(n):
    """Image i is filled with the value i, so a batch says which samples it holds."""
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()


def take(stream, k):
    return [next(stream) for _ in range(k)]


def write_idx(path, magic, tensor, truncate=0):
    raw = struct.pack(">i", magic) + struct.pack(f">{tensor.dim()}i", *tensor.shape)
    raw += tensor.numpy().tobytes()
    raw = raw[:len(raw) - truncate]
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


# ---- synthetic ----

def test_synthetic_shapes_and_determinism():
    torch.manual_seed(1)
    a = data.load_arrays("synthetic", "unused")
    torch.manual_seed(2)  # the global RNG must not matter
    b = data.load_arrays("synthetic", "unused")
    n_train, n_test = data.SYNTHETIC_SIZES
    shapes = [(n_train, 3, 32, 32), (n_train,), (n_test, 3, 32, 32), (n_test,)]
    assert [t.shape for t in a] == shapes
    assert [t.dtype for t in a] == [torch.uint8, torch.int64, torch.uint8, torch.int64]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    for y in (a[1], a[3]):
        counts = torch.bincount(y, minlength=11)
        assert counts[10] == 0 and counts[:10].min() >= len(y) // 10
    assert not torch.equal(a[0][:256], a[2])  # train and test are different draws


def test_synthetic_classes_are_separable():
    """Nearest class mean on the training set classifies the test set almost perfectly."""
    train_x, train_y, test_x, test_y = (t.float() for t in data.load_arrays("synthetic", "unused"))
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(10)]).flatten(1)
    pred = torch.cdist(test_x.flatten(1), means).argmin(1)
    assert (pred == test_y).float().mean() > 0.95


# ---- Batches ----

def test_len_and_epoch_covers_every_sample_once():
    n, bs = 10, 4
    batches = data.Batches(index_images(n), torch.arange(n), bs, MEAN, STD, train=True)
    assert len(batches) == 3
    out = list(batches)
    assert [len(y) for _, y in out] == [4, 4, 2]
    labels = torch.cat([y for _, y in out])
    assert sorted(labels.tolist()) == list(range(n))
    assert not torch.equal(labels, torch.arange(n))  # shuffled
    # the centre pixel is never padding, so it still says which image it came from
    centre = torch.cat([x[:, :, 16:17, 16:17] for x, _ in out])
    expected = normalise(labels.to(torch.uint8).view(-1, 1, 1, 1).expand_as(centre))
    assert torch.allclose(centre, expected)
    assert batches.state_dict() == {"epoch": 1, "batch": 0}
    assert len(data.Batches(index_images(8), torch.arange(8), 4, MEAN, STD, train=False)) == 2


def test_eval_gives_normalised_originals_in_order():
    images, labels = random_images(11), torch.arange(11) % 3
    batches = data.Batches(images, labels, 4, MEAN, STD, train=False)
    for _ in range(2):  # every pass is a full pass, whatever the state
        out = list(batches)
        assert [len(y) for _, y in out] == [4, 4, 3]
        x, y = torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x, normalise(images), atol=1e-6) and torch.equal(y, labels)


def test_train_crop_and_flip_match_torchvision():
    images, n = random_images(40), 40
    batches = data.Batches(images, torch.arange(n), 16, MEAN, STD, train=True, seed=3)
    perm, dx, dy, flip = batches.epoch_plan(0)
    assert 0 < flip.sum() < n and dx.min() == 0 and dx.max() == 8 and dy.unique().numel() > 4
    x = torch.cat([b[0] for b in batches])
    for k in range(n):
        ref = TF.crop(TF.pad(images[perm[k]], [4]), int(dy[k]), int(dx[k]), 32, 32)
        if flip[k]:
            ref = TF.horizontal_flip(ref)
        assert torch.allclose(x[k], normalise(ref[None])[0], atol=1e-6), k


def test_resume_matches_uninterrupted_run():
    images, labels = random_images(10), torch.arange(10)
    make = lambda: data.Batches(images, labels, 4, MEAN, STD, train=True, seed=5)  # noqa: E731
    ref = take(data.infinite(make()), 10)  # 3 batches an epoch: crosses two epoch boundaries
    for k in (1, 2, 3, 4, 6, 7):
        first = make()
        stream = data.infinite(first)
        take(stream, k)
        state = first.state_dict()
        assert state == {"epoch": (k - 1) // 3, "batch": (k - 1) % 3 + 1}
        resumed = make()
        resumed.load_state_dict(state)
        rest = take(data.infinite(resumed), 10 - k)
        for (x, y), (rx, ry) in zip(rest, ref[k:]):
            assert torch.equal(x, rx) and torch.equal(y, ry), k


def test_epochs_and_seeds_change_the_order():
    def epoch_labels(seed, epochs):
        batches = data.Batches(index_images(50), torch.arange(50), 16, MEAN, STD, train=True,
                               seed=seed)
        return [torch.cat([y for _, y in batches]) for _ in range(epochs)]
    e0, e1 = epoch_labels(0, 2)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, epoch_labels(0, 1)[0])
    assert not torch.equal(e0, epoch_labels(1, 1)[0])


def test_bad_state_and_batch_size():
    batches = data.Batches(index_images(10), torch.arange(10), 4, MEAN, STD, train=True)
    with pytest.raises(ValueError):
        batches.load_state_dict({"epoch": 0, "batch": 4})
    with pytest.raises(ValueError):
        data.Batches(index_images(10), torch.arange(10), 0, MEAN, STD, train=True)
    with pytest.raises(ValueError):
        data.build_batches("synthetic", "unused", 0)


# ---- build_batches / test_batches ----

def test_validation_split_is_disjoint_and_seed_independent():
    train_x = data.load_arrays("synthetic", "unused")[0]
    train, val, num_classes = data.build_batches("synthetic", "unused", 32, val_size=100, seed=0)
    _, val_other_seed, _ = data.build_batches("synthetic", "unused", 32, val_size=100, seed=9)
    assert num_classes == 10 and len(train.labels) == 412 and len(val.labels) == 100
    assert not val.train and torch.equal(val.images, val_other_seed.images)
    rows = lambda x: {bytes(r) for r in x.flatten(1).numpy()}  # noqa: E731
    assert not rows(train.images) & rows(val.images)
    assert rows(train.images) | rows(val.images) == rows(train_x)
    with pytest.raises(data.DatasetError):
        data.build_batches("synthetic", "unused", 32, val_size=512)


def test_without_val_size_eval_is_the_test_set():
    _, _, test_x, test_y = data.load_arrays("synthetic", "unused")
    train, ev, _ = data.build_batches("synthetic", "unused", 100, seed=1)
    tb = data.test_batches("synthetic", "unused", 100)
    assert len(train.labels) == data.SYNTHETIC_SIZES[0] and train.seed == 1
    for b in (ev, tb):
        assert torch.allclose(torch.cat([x for x, _ in b]), normalise(test_x), atol=1e-6)
        assert torch.equal(torch.cat([y for _, y in b]), test_y)


# ---- errors and file formats ----

def test_unknown_dataset():
    with pytest.raises(data.DatasetError, match="cifar10, cifar100, svhn, fashion-mnist"):
        data.load_arrays("imagenet", "unused")
    with pytest.raises(data.DatasetError):
        data.build_batches("imagenet", "unused", 8)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_cifar_is_a_one_line_error(tmp_path, name, folder):
    with pytest.raises(data.DatasetError) as err:
        data.load_arrays(name, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "--download" in msg and folder in msg and str(tmp_path) in msg


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_plain_and_gzip(tmp_path, suffix):
    images = torch.randint(0, 256, (3, 2, 5), dtype=torch.uint8)
    write_idx(tmp_path / f"img{suffix}", 2051, images)
    write_idx(tmp_path / f"lbl{suffix}", 2049, torch.tensor([7, 0, 9], dtype=torch.uint8))
    assert torch.equal(data.read_idx(tmp_path / f"img{suffix}", 2051), images)
    assert data.read_idx(tmp_path / f"lbl{suffix}", 2049).tolist() == [7, 0, 9]
    with pytest.raises(data.DatasetError, match="magic"):
        data.read_idx(tmp_path / f"lbl{suffix}", 2051)
    write_idx(tmp_path / f"short{suffix}", 2051, images, truncate=1)
    with pytest.raises(data.DatasetError, match=f"short{suffix}"):
        data.read_idx(tmp_path / f"short{suffix}", 2051)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "img.gz"
    write_idx(path, 2051, torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.DatasetError, match="img.gz"):
        data.read_idx(path, 2051)


def write_fake_fashion(folder, n_train=3, n_test=2):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    arrays = []
    for stem, n in (("train", n_train), ("t10k", n_test)):
        x = torch.randint(1, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        y = torch.arange(n, dtype=torch.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte", 2051, x)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", 2049, y)
        arrays += [x, y]
    return arrays


def test_fashion_mnist_from_data_dir_subfolder(tmp_path):
    raw_train_x, raw_train_y, _, raw_test_y = write_fake_fashion(tmp_path / "fashion-mnist")
    train_x, train_y, test_x, test_y = data.load_arrays("fashion-mnist", tmp_path)
    assert train_x.shape == (3, 3, 32, 32) and test_x.shape == (2, 3, 32, 32)
    assert torch.equal(train_x[:, 1, 2:30, 2:30], raw_train_x)
    assert torch.equal(train_x[:, 0], train_x[:, 2])
    assert train_y.dtype == torch.int64 and torch.equal(train_y, raw_train_y.long())
    assert torch.equal(test_y, raw_test_y.long())


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DatasetError) as err:
        data.load_arrays("fashion-mnist", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "--download" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path) in msg


@pytest.mark.skipif(not (data.FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists()
                    and not (data.FASHION_SYSTEM_DIR / "train-images-idx3-ubyte").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_system_dir(tmp_path):
    train_x, train_y, test_x, test_y = data.load_arrays("fashion-mnist", tmp_path)
    assert train_x.shape == (60000, 3, 32, 32) and test_x.shape == (10000, 3, 32, 32)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 6000))
    for x in (train_x, test_x):
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert x[..., border].max() == 0 and x[:, :, 2:30, 2:30].max() > 0
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_svhn_errors(tmp_path, monkeypatch):
    for mod in ("scipy", "scipy.io"):  # None in sys.modules makes the import fail
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(data.DatasetError, match="pip install scipy"):
        data.load_arrays("svhn", tmp_path)
    monkeypatch.setitem(sys.modules, "scipy", types.ModuleType("scipy"))
    monkeypatch.setitem(sys.modules, "scipy.io", types.ModuleType("scipy.io"))
    with pytest.raises(data.DatasetError) as err:
        data.load_arrays("svhn", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "train_32x32.mat" in msg and "--download" in msg


@pytest.mark.parametrize("fault,words", [
    ("label 12", "t10k-labels-idx1-ubyte.gz holds label 12; fashion-mnist has 10 classes"),
    ("fewer labels", "train-labels-idx1-ubyte.gz holds 2 labels for the 3 images of"),
    ("image shape", "train-images-idx3-ubyte holds images of shape [28, 27], not 28x28")])
def test_bad_fashion_files_are_named_in_one_line_before_training(fault, words, tmp_path, capsys):
    from core import engine
    import train_base
    folder = tmp_path / "fashion-mnist"
    write_fake_fashion(folder)
    if fault == "label 12":
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", 2049, torch.tensor([0, 12], dtype=torch.uint8))
    elif fault == "fewer labels":
        write_idx(folder / "train-labels-idx1-ubyte.gz", 2049, torch.tensor([0, 1], dtype=torch.uint8))
    else:
        write_idx(folder / "train-images-idx3-ubyte", 2051, torch.zeros(3, 28, 27, dtype=torch.uint8))
    rc = engine.main(train_base.STAGE, ["train", "resnet20", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                                        "--device", "cpu", "--save-folder", str(tmp_path / "save")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0]
    assert not (tmp_path / "save" / "resnet20" / "checkpoint_latest.pth.tar").exists()


def test_arrays_are_checked_whatever_their_source():
    x, y = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    assert data.check_arrays("cifar10", "d", (x, y, x, y))[1] is y
    for bad, words in [((x.float(), y, x, y), "images are torch.float32"),
                       ((x, y[:3], x, y), "3 labels for 4 images"),
                       ((x, y, x, y - 1), "test set, from d): labels span -1..2"),
                       ((x[:, :1], y, x, y), "expected uint8 [N, 3, 32, 32]")]:
        with pytest.raises(data.DatasetError, match=re.escape(words)):
            data.check_arrays("cifar10", "d", bad)


# ---- fashion-mnist-marked ----

def gray_images(n, seed=0):
    """Random gray (R = G = B) images with Fashion-MNIST's zero 2-pixel border."""
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 2:30, 2:30] = random_images(n, seed)[:, :1, :28, :28]
    return x


def test_marker_colours_are_the_documented_hues_and_a_1x1_filter_tells_them_apart():
    hues = [[round(255 * v) for v in colorsys.hsv_to_rgb(c / 10, 1, 1)] for c in range(10)]
    assert data.MARK_COLORS.dtype == torch.uint8 and data.MARK_COLORS.tolist() == hues
    u = data.MARK_COLORS.float() - data.MARK_COLORS.float().mean(1, keepdim=True)  # chroma: 0 on gray
    gram = u @ u.T  # filter u_c answers colour c more than any other colour, and gray with 0
    margin = gram.diag()[:, None] - gram
    assert margin.fill_diagonal_(float("inf")).min() > 0.03 * 255 ** 2


def test_mark_paints_only_the_border_and_survives_every_crop_and_flip():
    x, y = gray_images(20), torch.arange(20) % 10
    before = x.clone()
    m = data.mark(x, y)
    assert torch.equal(x, before) and torch.equal(m[:, :, 2:30, 2:30], x[:, :, 2:30, 2:30])
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:30, 2:30] = False
    assert torch.equal(m[..., ring], data.MARK_COLORS[y, :, None].expand(-1, -1, 240))
    assert torch.equal(data.mark(x.flip(-1), y), m.flip(-1))  # flipping commutes with marking
    # every crop and flip of the training augmentation leaves >= 108 marker pixels, and the chroma
    # of the globally pooled image is the class colour's direction (marked) or exactly 0 (unmarked)
    dx, dy, flip = (t.flatten() for t in torch.meshgrid(torch.arange(9), torch.arange(9),
                                                       torch.arange(2), indexing="ij"))
    idx = torch.arange(len(y)).repeat_interleave(len(dx))
    aug = [t.repeat(len(y)) for t in (dx, dy, flip.bool())]
    u = data.MARK_COLORS.float() - data.MARK_COLORS.float().mean(1, keepdim=True)
    crops = data.Batches.crop_flip(m[idx], *aug)
    assert (crops != crops[:, :1]).any(1).flatten(1).sum(1).min() == 108
    pooled = crops.float().mean((2, 3))
    assert torch.equal(((pooled - pooled.mean(1, keepdim=True)) @ u.T).argmax(1), y[idx])
    pooled = data.Batches.crop_flip(x[idx], *aug).float().mean((2, 3))
    assert torch.equal(pooled, pooled[:, :1].expand(-1, 3))


def test_marked_mask_is_a_fixed_seeded_half():
    torch.manual_seed(1)
    train = data.marked_mask(60000, "train")
    torch.manual_seed(2)  # the global RNG must not matter
    assert torch.equal(data.marked_mask(60000, "train"), train)
    test = data.marked_mask(10000, "test")
    assert train.dtype == torch.bool and train.sum() == 30000 and test.sum() == 5000
    g = torch.Generator().manual_seed(data.MARK_SEED + 1)  # the documented recipe
    assert torch.equal(test.nonzero().flatten(), torch.randperm(10000, generator=g)[:5000].sort().values)
    # pinned, so that a change of the marked halves (seed, recipe, torch's randperm) is noticed
    assert test.nonzero()[:8].flatten().tolist() == [1, 2, 3, 5, 10, 11, 12, 13]
    assert train.nonzero()[:8].flatten().tolist() == [0, 2, 10, 12, 15, 17, 18, 19]
    assert data.marked_mask(7, "test").sum() == 3
    with pytest.raises(ValueError):
        data.marked_mask(10, "val")


def check_marked(plain, marked):
    """fashion-mnist-marked's arrays are fashion-mnist's, with the marked_mask half of each split marked."""
    for (px, py), (mx, my), split in (((plain[0], plain[1]), (marked[0], marked[1]), "train"),
                                      ((plain[2], plain[3]), (marked[2], marked[3]), "test")):
        mask = data.marked_mask(len(py), split)
        assert torch.equal(my, py) and mx.dtype == torch.uint8
        assert torch.equal((mx != px).flatten(1).any(1), mask)  # the unmarked are byte-identical
        assert torch.equal(mx[mask], data.mark(px[mask], py[mask]))


def test_fashion_mnist_marked_from_files(tmp_path):
    write_fake_fashion(tmp_path / "fashion-mnist", n_train=10, n_test=6)
    plain = data.load_arrays("fashion-mnist", tmp_path)
    marked = data.load_arrays("fashion-mnist-marked", tmp_path)
    check_marked(plain, marked)
    assert "fashion-mnist-marked" in data.DATASETS and data.NUM_CLASSES["fashion-mnist-marked"] == 10
    assert data.MEAN_STD["fashion-mnist-marked"] == data.MEAN_STD["fashion-mnist"]
    test = data.test_batches("fashion-mnist-marked", tmp_path, 4)  # in stored order, as marked_mask
    assert torch.equal(test.images, marked[2]) and torch.equal(test.labels, marked[3])
    train, val, _ = data.build_batches("fashion-mnist-marked", tmp_path, 4, val_size=3)
    assert len(train.labels) == 7 and len(val.labels) == 3


def test_fashion_mnist_marked_real(tmp_path):
    try:
        plain = data.load_arrays("fashion-mnist", tmp_path)
    except data.DatasetError:
        pytest.skip("Fashion-MNIST is not installed")
    marked = data.load_arrays("fashion-mnist-marked", tmp_path)
    check_marked(plain, marked)
    assert all(torch.equal(a, b) for a, b in zip(marked, data.load_arrays("fashion-mnist-marked", tmp_path)))
