"""data.py: precomp dataset, collate, loaders, input validation, memory, and the toy generator."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

import data
import toy as toy_lib
from conftest import one_line_error, shared_path
from labels import image_targets
from vocab import Vocabulary, build_vocab, encode, tokenize

R, D = 3, 5  # regions, img_dim of the mini datasets


def write_split(folder, split, ims, caps):
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, f'{split}_ims.npy'), ims)
    with open(os.path.join(folder, f'{split}_caps.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(caps) + '\n')


def features(n_img, seed=0):
    """(n_img, R, D) float32, image i's features all near i so a wrong index shows."""
    rng = np.random.default_rng(seed)
    return (np.arange(n_img)[:, None, None] + rng.random((n_img, R, D))).astype(np.float32)


@pytest.fixture(scope='module')
def real_caps():
    with open(shared_path('data', 'f30k_precomp', 'test_caps.txt'), encoding='utf-8') as f:
        return [next(f).strip() for _ in range(40)]  # 8 images x 5 real captions


@pytest.fixture
def mini(tmp_path, real_caps):
    """tmp_path/mini_precomp with train (8 images, 5 caps each), dev (4 images), test (4 images, 1 cap each)."""
    folder = tmp_path / 'mini_precomp'
    write_split(folder, 'train', features(8), real_caps)
    write_split(folder, 'dev', features(4, 1), real_caps[:20])
    write_split(folder, 'test', features(4, 2), real_caps[:4])
    vocab = build_vocab(str(tmp_path), 'mini_precomp', threshold=1, splits=('train',))
    return str(tmp_path), vocab


def test_items_pair_caption_k_with_image_k_div_5(mini, real_caps):
    path, vocab = mini
    labels = ['man', 'hat', 'glasses', 'zebra']
    ds = data.PrecompDataset(path, 'mini_precomp', 'train', vocab, labels)
    assert (len(ds), ds.n_images, ds.im_div, ds.split) == (40, 8, 5, 'train')
    assert ds.raw_captions == real_caps and ds.tokens[7] == tokenize(real_caps[7])
    ims = np.load(ds.ims_path)
    for k in (0, 4, 5, 7, 39):
        image, caption, target, cap_id, img_id = ds[k]
        assert (cap_id, img_id) == (k, k // 5)
        assert image.dtype == torch.float32 and torch.equal(image, torch.from_numpy(ims[k // 5]))
        assert caption.dtype == torch.long and caption.tolist() == encode(vocab, tokenize(real_caps[k]))
        assert torch.equal(target, torch.from_numpy(ds.targets[k // 5]))
    assert ds.targets.shape == (8, 4) and ds.targets.dtype == np.float32
    np.testing.assert_array_equal(ds.targets, image_targets(ds.tokens, labels, 5))
    # 'glasses' is in captions 1-3 of image 0 only: the target is the union over its 5 captions.
    assert ds.targets[0].tolist() == [1, 1, 1, 0]
    assert ds[0][2] is not None and data.PrecompDataset(path, 'mini_precomp', 'train', vocab)[0][2] is None


def test_one_caption_per_image(mini):
    ds = data.PrecompDataset(*mini[:1], 'mini_precomp', 'test', mini[1])
    assert (len(ds), ds.n_images, ds.im_div) == (4, 4, 1)
    assert [ds[k][4] for k in range(4)] == [0, 1, 2, 3]


def test_max_images_keeps_first_n_images_and_their_captions(mini, real_caps):
    ds = data.PrecompDataset(*mini[:1], 'mini_precomp', 'train', mini[1], ['man'], max_images=3)
    assert (len(ds), ds.n_images, ds.images.shape, ds.targets.shape) == (15, 3, (3, R, D), (3, 1))
    assert ds.raw_captions == real_caps[:15] and ds[14][4] == 2


def test_collate_pads_with_zeros_and_keeps_true_lengths(mini):
    ds = data.PrecompDataset(*mini[:1], 'mini_precomp', 'train', mini[1], ['man', 'hat'])
    items = [ds[k] for k in (3, 0, 12)]
    images, captions, lengths, targets, cap_ids, img_ids = data.collate_fn(items)
    assert images.shape == (3, R, D) and targets.shape == (3, 2)
    assert lengths.tolist() == [len(it[1]) for it in items] and captions.shape == (3, max(lengths))
    for b, it in enumerate(items):  # not sorted: row b is item b
        assert torch.equal(captions[b, :lengths[b]], it[1]) and not captions[b, lengths[b]:].any()
    assert cap_ids.tolist() == [3, 0, 12] and img_ids.tolist() == [0, 0, 2]
    assert data.collate_fn([it[:2] + (None,) + it[3:] for it in items])[3] is None


@pytest.mark.parametrize('workers', [0, 2])
def test_loaders_cover_every_caption(mini, workers):
    path, vocab = mini
    train, val = data.get_loaders(path, 'mini_precomp', vocab, batch_size=16, workers=workers, labels=['man'])
    assert train.num_workers == workers and val.n_images == 4
    for _ in range(2):  # persistent workers serve a second epoch
        seen = []
        for images, captions, lengths, targets, cap_ids, img_ids in train:
            assert images.shape[1:] == (R, D) and targets.shape[1] == 1 and torch.equal(img_ids, cap_ids // 5)
            seen += cap_ids.tolist()
        assert sorted(seen) == list(range(40))
    assert [val[k][3] for k in range(len(val))] == list(range(20))  # val in file order
    test = data.PrecompDataset(path, 'mini_precomp', 'test', vocab)  # as evaluation.py reads a split
    assert [test[k][4] for k in range(len(test))] == [0, 1, 2, 3]


def test_pickled_dataset_reopens_the_mmap_instead_of_copying_it(mini):
    ds = data.PrecompDataset(*mini[:1], 'mini_precomp', 'train', mini[1], ['man'], max_images=6)
    blob = pickle.dumps(ds)  # what a spawned loader worker receives
    assert b'A man with glasses' not in blob and ds.images.tobytes() not in blob
    copy = pickle.loads(blob)
    assert isinstance(copy.images, np.memmap) and copy.images.shape == (6, R, D)
    for a, b in zip(ds[29], copy[29]):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b


def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs Linux /proc')
def test_features_are_memory_mapped_not_read_into_ram(tmp_path):
    """A 206 MB file: construction (including the full NaN scan) and item access stay far below it."""
    folder = tmp_path / 'big_precomp'
    folder.mkdir()
    n_img = 700
    ims = np.lib.format.open_memmap(folder / 'test_ims.npy', mode='w+', dtype=np.float32,
                                    shape=(n_img, 36, 2048))
    for i0 in range(0, n_img, 50):
        ims[i0:i0 + 50] = i0
    ims.flush()
    del ims
    (folder / 'test_caps.txt').write_text('a dog on the grass .\n' * n_img)
    vocab = Vocabulary()
    for w in ('<pad>', '<start>', '<end>', '<unk>', 'dog'):
        vocab.add_word(w)
    data.PrecompDataset(str(tmp_path), 'big_precomp', 'test', vocab, max_images=1)[0]  # warm up torch, nltk
    before = rss_mb()
    ds = data.PrecompDataset(str(tmp_path), 'big_precomp', 'test', vocab)
    assert ds.images.nbytes <= data.FULL_SCAN_BYTES  # so the full scan ran
    for k in range(0, n_img, 100):
        assert ds[k][0][0, 0] == k // 50 * 50
    assert isinstance(ds.images, np.memmap)
    # Reading the file whole costs >= 206 MB; each touched image may map up to a 2 MB page-cache folio.
    assert rss_mb() - before < 50, f'RSS grew {rss_mb() - before:.0f} MB for a 206 MB file'


def test_bad_inputs_fail_with_a_message_naming_the_file(mini, tmp_path, monkeypatch):
    path, vocab = mini
    folder = tmp_path / 'mini_precomp'

    def fails(exc, pattern, split='bad'):
        with pytest.raises(exc, match=pattern):
            data.PrecompDataset(path, 'mini_precomp', split, vocab)

    with pytest.raises(FileNotFoundError, match='data folder not found: .*nope_precomp'):
        data.PrecompDataset(path, 'nope_precomp', 'train', vocab)
    fails(FileNotFoundError, re.escape(str(folder / 'val_ims.npy')), 'val')
    os.remove(folder / 'test_caps.txt')
    fails(FileNotFoundError, re.escape(str(folder / 'test_caps.txt')), 'test')
    caps = ['a dog .'] * 10
    nan = features(2)
    nan[1, 0, 0] = np.nan
    for ims, pattern in [(features(3), r'bad_caps.txt has 10 captions but .*bad_ims.npy has 3 images'),
                         (features(2)[:, 0], r'bad_ims.npy: .*got shape \(2, 5\)'),
                         (np.ones((2, R, D), np.int64), r'bad_ims.npy: .*dtype int64'),
                         (nan, r'bad_ims.npy: image 1 has NaN or inf')]:
        write_split(folder, 'bad', ims, caps)
        fails(ValueError, pattern)
    write_split(folder, 'bad', features(2), caps[:3] + [''] + caps[4:])
    fails(ValueError, r'bad_caps.txt: line 4 is an empty caption')
    # Files over FULL_SCAN_BYTES are not scanned when opened; the item itself is checked.
    inf = features(2)
    inf[1, 2, 3] = np.inf
    write_split(folder, 'bad', inf, caps)
    fails(ValueError, r'bad_ims.npy: image 1 has NaN or inf')
    monkeypatch.setattr(data, 'FULL_SCAN_BYTES', 0)
    ds = data.PrecompDataset(path, 'mini_precomp', 'bad', vocab)
    assert ds[4][4] == 0
    with pytest.raises(ValueError, match=r'bad_ims.npy: image 1 has NaN or inf'):
        ds[5]


def test_check_finite_finds_the_first_bad_image_across_chunks(tmp_path):
    ims = features(10)
    ims[7, 0, 0], ims[9, 2, 4] = np.nan, -np.inf
    np.save(tmp_path / 'x.npy', ims)
    mm = data.open_features(str(tmp_path / 'x.npy'))
    for chunk_bytes in (1, R * D * 4 * 3, 10 ** 6):  # one image, 3 images (uneven last), all at once
        with pytest.raises(ValueError, match='image 7 has'):
            data.check_finite(str(tmp_path / 'x.npy'), mm, chunk_bytes)
    data.check_finite(str(tmp_path / 'x.npy'), mm[:7], 1)  # the first 7 are fine


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp('toy')
    return data.main(['--make_toy', str(out)])


def test_toy_data_shapes_and_captions_name_the_objects(toy):
    for split, n_img in toy_lib.TOY_SPLITS.items():
        ims = np.load(os.path.join(toy, f'{split}_ims.npy'))
        assert ims.shape == (n_img, 12, 64) and ims.dtype == np.float32 and ims.min() >= 0
        assert np.isfinite(ims).all()
        with open(os.path.join(toy, f'{split}_caps.txt'), encoding='utf-8') as f:
            caps = f.read().splitlines()
        assert len(caps) == 5 * n_img and all(caps)
    objects = set(toy_lib.OBJECTS)
    named = [{t for t in tokenize(c) if t in objects} for c in caps]
    assert all(len(n) >= 2 for n in named)  # every caption names 2 or 3 objects
    per_image = [set.union(*named[i:i + 5]) for i in range(0, len(caps), 5)]
    assert all(2 <= len(n) <= 3 for n in per_image)  # ... of its image's 2-3 objects
    assert len({frozenset(n) for n in per_image}) > 0.75 * len(per_image)  # mostly distinct object sets
    assert len(set(caps)) > 0.9 * len(caps) and any(c[0].isupper() for c in caps)


def test_toy_data_loads_with_vocab_and_labels(toy):
    path, name = os.path.split(toy)
    vocab = build_vocab(path, name, splits=('test',))
    assert all(vocab(w) != vocab('<unk>') for w in toy_lib.OBJECTS + toy_lib.COLOURS)
    ds = data.PrecompDataset(path, name, 'test', vocab, list(toy_lib.OBJECTS))
    assert ds.targets.sum(1).min() >= 2 and ds.targets.sum(1).max() <= 3


def test_toy_generator_is_deterministic_by_seed(tmp_path):
    def files(out, seed):
        folder = toy_lib.make_toy(str(tmp_path / out), seed, sizes={'train': 20, 'test': 5})
        return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))}

    a = files('a', 0)
    assert len(a) == 4 and a == files('b', 0)
    c = files('c', 1)
    assert all(a[f] != c[f] for f in a)


def test_toy_data_of_another_seed_is_not_replaced_without_overwrite(tmp_path, capsys):
    sizes, out = {'train': 20, 'test': 5}, str(tmp_path / 'd')
    folder = toy_lib.make_toy(out, 0, sizes=sizes)
    files = lambda: {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))}  # noqa: E731
    first, mtimes = files(), {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    toy_lib.make_toy(out, 0, sizes=sizes)  # the same seed: the same bytes, left as they are
    assert {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)} == mtimes
    with pytest.raises(ValueError) as e:
        toy_lib.make_toy(out, 1, sizes=sizes)
    assert str(e.value) == (f'{os.path.join(folder, "train_ims.npy")} exists and holds other toy data (another '
                            f'--seed?): pass --overwrite to replace it, or choose another DIR')
    assert files() == first  # checked before anything is written
    toy_lib.make_toy(out, 1, sizes=sizes, overwrite=True)
    assert all(files()[f] != first[f] for f in first)
    assert '--overwrite' in one_line_error(toy_lib.main, [out])  # the CLI: its default sizes are other toy data too
    assert capsys.readouterr().out == ''


def test_data_py_make_toy_passes_overwrite_and_checks_seed(tmp_path, capsys):
    """python data.py --make_toy DIR is toy.py DIR: --overwrite replaces another seed's toy data there,
    and a --seed numpy cannot take is refused naming the flag (not numpy's own message)."""
    out = str(tmp_path / 'd')
    data.main(['--make_toy', out, '--seed', '1'])
    before = open(os.path.join(out, 'toy_precomp', 'train_ims.npy'), 'rb').read()
    with pytest.raises(SystemExit) as e:
        data.main(['--make_toy', out])
    assert '--overwrite' in e.value.code
    data.main(['--make_toy', out, '--overwrite'])  # seed 0 replaces seed 1
    assert open(os.path.join(out, 'toy_precomp', 'train_ims.npy'), 'rb').read() != before
    for main in (data.main, lambda argv: toy_lib.main(argv[1:])):
        for seed in ('-5', str(2 ** 70)):
            with pytest.raises(SystemExit) as e:
                main(['--make_toy', out, '--seed', seed])
            assert e.value.code == 2 and '--seed' in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / 'file').write_text('')  # a file where --make_toy needs a folder
    msg = one_line_error(data.main, ['--make_toy', str(tmp_path / 'file' / 'sub')])  # one line, exit status 1
    assert str(tmp_path / 'file') in msg, msg
    assert capsys.readouterr().err == ''  # and nothing else was printed
