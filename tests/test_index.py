"""index.py: the gallery index gives search exactly the in-memory encodings' results, is reused,
is rebuilt (saying why) for another checkpoint, changed features or another precision, is never
read half-written, shows progress while building, and keeps a scoring pass's resident memory far
below the gallery's size (a real subprocess, its peak RSS from /proc). Random-weight checkpoints on
toy data: nothing trains here."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import index
import search
import toy
import vocab as vocab_lib
from conftest import ROOT
from model import CASC, Config

SIZES = {'train': 40, 'dev': 10, 'test': 30}
QUERIES = ['a red dog', 'a blue cat next to a green bench', 'boat']


def random_checkpoint(path, data_path, vocab_path, seed: int = 0, **sizes) -> str:
    """A loadable checkpoint of random weights for the toy_precomp folder under data_path -> path."""
    words = vocab_lib.deserialize_vocab(os.path.join(vocab_path, 'toy_precomp_vocab.json')).words()
    cfg = Config(**{'vocab_size': len(words), 'img_dim': 64, 'embed_size': 16, 'word_dim': 8, 'num_labels': 10,
                    'label_hidden': 8, **sizes})
    torch.manual_seed(seed)
    model = CASC(cfg)
    opt = {**dataclasses.asdict(cfg), 'data_name': 'toy_precomp', 'data_path': str(data_path)}
    torch.save({'model': model.state_dict(), 'opt': opt, 'vocab': words,
                'labels': [f'label{k}' for k in range(cfg.num_labels)]}, str(path))
    return str(path)


def toy_world(root) -> tuple:
    """Toy data (SIZES) and its vocabulary under root -> (data path, vocab path)."""
    data, vocab_path = root / 'data', root / 'vocab'
    toy.make_toy(str(data), sizes=SIZES)
    vocab_lib.main(['--data_path', str(data), '--data_name', 'toy_precomp', '--vocab_path', str(vocab_path)])
    return str(data), str(vocab_path)


@pytest.fixture
def world(tmp_path, capsys):
    data, vocab_path = toy_world(tmp_path)
    ckpt = random_checkpoint(tmp_path / 'a.pth.tar', data, vocab_path)
    capsys.readouterr()
    return data, ckpt, tmp_path


def searcher(world, index_dir=None, ckpt=None, **kw):
    data, default, _ = world
    return search.Searcher(ckpt or default, data, 'test', device='cpu', index_dir=index_dir, **kw)


def results(s) -> tuple:
    return s.text(QUERIES, 7), s.image([0, 5, 29], 9)


def test_index_results_equal_the_in_memory_ones(world):
    idx = str(world[2] / 'idx')
    assert results(searcher(world, idx)) == results(searcher(world))  # bit for bit: the same encodings
    assert sorted(os.listdir(idx)) == ['captions', 'images']
    side = index.read_meta(os.path.join(idx, 'images'))
    assert side['n'] == SIZES['test'] and side['key']['precision'] == 'fp32'
    assert os.path.getsize(os.path.join(idx, 'images', 'emb')) == SIZES['test'] * 12 * 16 * 4  # (n, R, d) float32


def test_index_is_reused_and_rebuilt_saying_why(world, capsys):
    data, ckpt, root = world
    idx = str(root / 'idx')
    expected = results(searcher(world, idx))
    assert capsys.readouterr().err.count('building it') == 2  # images, captions
    emb = os.path.join(idx, 'images', 'emb')
    built = os.stat(emb).st_mtime_ns
    os.utime(os.path.join(data, 'toy_precomp', 'test_ims.npy'))  # new times, same contents: reused
    assert results(searcher(world, idx)) == expected
    assert 'index' not in capsys.readouterr().err and os.stat(emb).st_mtime_ns == built

    other = random_checkpoint(root / 'b.pth.tar', data, str(root / 'vocab'), seed=1)
    before = results(searcher(world, idx, other))
    assert before == results(searcher(world, ckpt=other))
    err = capsys.readouterr().err
    assert err.count('built for another checkpoint file') == 2 and 'rebuilding it' in err

    ims_path = os.path.join(data, 'toy_precomp', 'test_ims.npy')
    np.save(ims_path, np.load(ims_path)[::-1].copy())  # the same images, in reverse order
    fresh = results(searcher(world, idx, other))
    assert 'built for another features file' in capsys.readouterr().err
    assert fresh == results(searcher(world, ckpt=other))  # the new features' results
    assert fresh != before

    searcher(world, idx, other, precision='bf16').text(QUERIES, 3)
    assert 'another precision (fp32 then, bf16 now)' in capsys.readouterr().err


def test_a_half_written_index_is_never_read(world, monkeypatch, capsys):
    idx = world[2] / 'idx'
    idx.mkdir()
    (idx / '.images.tmp999999999').mkdir()  # left by a build whose process is gone
    calls = []

    def dies(*args, **kw):  # the build is stopped after its first batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*args, **kw)
    encode = index.encode_images
    monkeypatch.setattr(index, 'IMAGE_BATCH', 8)
    monkeypatch.setattr(index, 'encode_images', dies)
    with pytest.raises(KeyboardInterrupt):
        searcher(world, str(idx)).text(QUERIES, 3)
    assert os.listdir(idx) == []  # no half-written side, and the dead build's leftover removed
    monkeypatch.setattr(index, 'encode_images', encode)
    (idx / 'images').mkdir()
    (idx / 'images' / 'emb').write_bytes(b'\0' * 100)  # a side without meta.json: never complete
    assert searcher(world, str(idx)).text(QUERIES, 3) == searcher(world).text(QUERIES, 3)
    assert 'images: building it' in capsys.readouterr().err


def test_building_shows_progress(world, monkeypatch, capsys):
    monkeypatch.setenv('CASC_PROGRESS_SECONDS', '0')
    results(searcher(world, str(world[2] / 'idx')))
    err = capsys.readouterr().err
    assert 'indexing images' in err and 'indexing captions' in err


PEAK = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import search
    s = search.Searcher(sys.argv[2], sys.argv[3], 'big', device='cpu', index_dir=sys.argv[4], eval_memory_gb=0.01)
    def rss(kind):
        return int(dict(l.split(':', 1) for l in open('/proc/self/status'))[kind].split()[0]) * 1024
    open('/proc/self/clear_refs', 'w').write('5')  # VmHWM restarts from here
    before = rss('VmRSS')
    top = s.text(['a red dog and a blue cat'], 5)[0]['results'][0]['index']
    print(json.dumps({'growth': rss('VmHWM') - before, 'top': top}))
''')


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='needs Linux /proc to read peak RSS')
def test_scoring_memory_grows_far_less_than_the_gallery(world, capsys):
    """A 6,000-image gallery of 512-dim regions (about 150 MB encoded) scored in chunks of 10 MB
    (--eval_memory_gb 0.01): a text query over its index, in a fresh process, raises the peak
    resident memory by a small part of the gallery (in memory, the gallery alone would take it all).
    A gallery larger than RAM is scored the same way, a chunk at a time."""
    data, _, root = world
    n, folder = 6000, os.path.join(data, 'toy_precomp')
    rng = np.random.default_rng(0)
    np.save(os.path.join(folder, 'big_ims.npy'), np.maximum(rng.normal(size=(n, 12, 64)), 0).astype(np.float32))
    with open(os.path.join(folder, 'big_caps.txt'), 'w') as f:
        f.write(''.join(f'a red dog and a cat number {k}\n' for k in range(n)))  # one caption per image
    ckpt = random_checkpoint(root / 'big.pth.tar', data, str(root / 'vocab'), embed_size=512)
    idx = str(root / 'big_idx')
    search.Searcher(ckpt, data, 'big', device='cpu', index_dir=idx).gallery_images()  # built here
    gallery = sum(os.path.getsize(os.path.join(idx, 'images', f)) for f in os.listdir(os.path.join(idx, 'images')))
    out = subprocess.run([sys.executable, '-c', PEAK, ROOT, ckpt, data, idx], capture_output=True, text=True,
                         timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert gallery > 150e6 and 'building' not in out.stderr
    assert measured["growth"] < gallery / 5, (measured, gallery)
    print(f"peak RSS growth {measured['growth'] / 2 ** 20:.1f} MB for a {gallery / 2 ** 20:.0f} MB gallery")
