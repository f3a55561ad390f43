"""Shared fixtures. ``../shared`` (real captions, SCAN's vocab) exists in CI; in a user's clone
the tests that need it skip with a reason. The NLTK data the labels need ship in vocab/nltk_data,
so no test depends on NLTK_DATA or the network."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
sys.path.insert(0, ROOT)


def train_tiny(data_path, vocab_path, out, num_labels: int = 10) -> str:
    """vocab.py, labels.py and one epoch of a tiny train.py on the toy_precomp folder under
    data_path (64-dim features), quietly -> the checkpoint's path (out/checkpoint_0.pth.tar)."""
    import contextlib
    import io

    import labels
    import train
    import vocab
    common = ['--data_path', str(data_path), '--data_name', 'toy_precomp', '--vocab_path', str(vocab_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        vocab.main(common)
        labels.main(common + ['--num_labels', str(num_labels)])
        train.main(common + ['--num_epochs', '1', '--img_dim', '64', '--embed_size', '16', '--word_dim', '8',
                             '--num_labels', str(num_labels), '--label_hidden', '8', '--batch_size', '100',
                             '--workers', '0', '--val_step', '100000', '--log_step', '1000',
                             '--logger_name', str(out / 'log'), '--model_name', str(out), '--device', 'cpu'])
    return str(out / 'checkpoint_0.pth.tar')


def shared_path(*parts):
    """Path under ../shared, or skip the test (a user's clone has no ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f'{path} not present (it exists in CI, not in a user clone)')
    return path


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: end-to-end tests (real captions, toy training); CI runs them')
