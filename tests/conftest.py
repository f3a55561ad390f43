"""Shared fixtures and helpers. ``../shared`` (real captions, SCAN's vocab) exists in CI; in a
user's clone the tests that need it skip with a reason. The NLTK data the labels need ship in
vocab/nltk_data, so no test depends on NLTK_DATA or the network.

- one_line_error, load_checkpoint, toy_world: a CLI's one-line exit, a checkpoint read as it is,
  toy data with its vocabulary and labels;
- tiny(): random normalized regions and padded words with a label head, for the engine's unit tests;
- toy (session): toy data with its vocabulary and 20 labels; toy_model (session): the one toy
  model, trained once per pytest run on it, which the evaluation and training tests share.
"""
import contextlib
import io
import os
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)
# The project's modules are imported where they are used: one broken module fails its tests, not all.


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (real captions, toy training); CI runs them')


TRAINING_FIXTURES = {'toy_model'}  # and a test module's own, in its TRAINING_FIXTURES


def pytest_collection_modifyitems(config, items):
    """Every test that trains is slow, and so is every test that needs a fixture that trains (the
    toy model, or a file's own trained checkpoint): `pytest -m "not slow"` trains nothing."""
    for item in items:
        trains = TRAINING_FIXTURES | getattr(item.module, 'TRAINING_FIXTURES', set())
        if trains & set(getattr(item, 'fixturenames', ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """Every model in the tests is tiny: one thread is faster than several, and many times faster
    on a busy 2-core machine, where OpenMP threads spin waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_path(*parts):
    """Path under ../shared, or skip the test (a user's clone has no ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not present (it exists in CI, not in a user clone)')
    return path


# ---------------------------------------------------------------- tiny(): the engine's unit inputs

N_IMG, N_CAP, R, L, D, K, H = 3, 5, 4, 6, 8, 5, 7  # all distinct, so a swapped axis fails
LENS = torch.tensor([6, 2, 4, 1, 5])  # captions of different lengths, one full, one of a single word


def tiny(seed: int = 0, dtype=torch.float64) -> tuple:
    """-> img (N_IMG, R, D) l2-normalized regions, cap (N_CAP, L, D) l2-normalized words, zero past
    LENS, mask (N_CAP, L) True on real words, and a LabelHead (D -> H -> K) of random weights."""
    import engine
    import model
    g = torch.Generator().manual_seed(seed)
    img = engine.l2norm(torch.randn(N_IMG, R, D, generator=g, dtype=dtype))
    cap = engine.l2norm(torch.randn(N_CAP, L, D, generator=g, dtype=dtype))
    mask = torch.arange(L) < LENS[:, None]
    cap = cap * mask[..., None]
    head = model.LabelHead(D, H, K).to(dtype)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5, generator=g)
    return img, cap, mask, head


# ---------------------------------------------------------------- helpers the test files share

def one_line_error(call, *args) -> str:
    """call(*args), a CLI's main, must exit with one line 'error: ...' (util.one_line_errors: what
    sys.exit prints, exit status 1) -> that line."""
    with pytest.raises(SystemExit) as e:
        call(*args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def load_checkpoint(path) -> dict:
    """A checkpoint file as it is: on the CPU, tensors and plain containers only."""
    return torch.load(path, map_location='cpu', weights_only=True)


def toy_world(data_path, vocab_path, num_labels: int = 20, sizes=None) -> list:
    """With sizes (images per split), toy data in data_path/toy_precomp; then vocab.py and labels.py
    (num_labels) on data_path/toy_precomp into vocab_path, quietly -> the --data_path, --data_name
    and --vocab_path flags."""
    import labels
    import toy as toy_lib
    import vocab
    if sizes is not None:
        toy_lib.make_toy(str(data_path), sizes=sizes)
    common = ['--data_path', str(data_path), '--data_name', 'toy_precomp', '--vocab_path', str(vocab_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        vocab.main(common)
        labels.main(common + ['--num_labels', str(num_labels)])
    return common


# ---------------------------------------------------------------- the toy world and the toy model

TOY_SIZES = {'train': 400, 'dev': 60, 'test': 40, 'testall': 50}  # images per split, 5 captions each
# train.py flags of every toy model: 400 images x 5 captions / batch 100 = 20 iterations an epoch
SMALL = ['--img_dim', '64', '--embed_size', '32', '--word_dim', '16', '--num_labels', '20',
         '--label_hidden', '16', '--batch_size', '100', '--workers', '0', '--log_step', '5', '--device', 'cpu']


@pytest.fixture(scope='session')
def toy(tmp_path_factory):
    """Toy data (TOY_SIZES), its vocabulary and 20 labels -> namespace: root (a folder for runs),
    data, vocab_path, common (the --data_path, --data_name, --vocab_path flags)."""
    root = tmp_path_factory.mktemp('toy')
    data, vocab_path = root / 'data', root / 'vocab'
    common = toy_world(data, vocab_path, sizes=TOY_SIZES)
    return SimpleNamespace(root=root, data=str(data), vocab_path=str(vocab_path), common=common)


def train_argv(toy, out, *extra) -> list:
    """train.py's argv on the toy data with the SMALL model, checkpoints in out, logs in out/log."""
    return [*toy.common, *SMALL, '--logger_name', str(out / 'log'), '--model_name', str(out), *map(str, extra)]


TOY_MODEL_BATCH = 25


@pytest.fixture(scope='session')
def toy_model(toy):
    """The toy model, trained once per run: one epoch of train.py with the SMALL flags but batches of
    25 (80 iterations, seed 0: the (B, B) score matrices make small batches the quickest epoch),
    validated once -> the folder of that run (checkpoint_0.pth.tar, model_best.pth.tar, log/). Tests
    read it, or copy it before changing it."""
    import train
    out = toy.root / 'model'
    train.main(train_argv(toy, out, '--batch_size', TOY_MODEL_BATCH, '--num_epochs', 1, '--val_step', 1000))
    return out
