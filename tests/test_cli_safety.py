"""Issue 8, the command lines' safety: every bad input is refused before any work with one line
naming the flag or file (evaluation.py --fold5, --eval_memory_gb, output paths, vocabularies,
feature widths, --device); progress lines off a terminal; vocab.py and labels.py never replace a
different file without --overwrite; vocabularies and caption files checked; every script's
--help states each default once; the shipped NLTK data is used. Real files, real processes, real
checkpoints: conftest's toy model, scored on toy data of this module's sizes."""
import ast
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import evaluation
import labels as labels_lib
import vocab as vocab_lib
from conftest import ROOT, one_line_error, shared_path
from test_evaluation import authors_checkpoint

TRAINING_FIXTURES = {'world'}  # fixtures that train a model: their tests are slow (conftest)

SIZES = {'train': 40, 'dev': 20, 'test': 20, 'odd': 23, 'four': 4}  # odd, four: no 5 equal folds


# ---------------------------------------------------------------- the toy world

@pytest.fixture(scope='module')
def world(tmp_path_factory, toy, toy_model):
    """conftest's toy model (its checkpoint, vocabulary and labels) and toy data of SIZES to score."""
    import toy as toy_lib  # the module; `toy` here is conftest's toy world
    root = tmp_path_factory.mktemp('safety')
    toy_lib.make_toy(str(root / 'data'), sizes=SIZES)
    vocab = vocab_lib.deserialize_vocab(os.path.join(toy.vocab_path, 'toy_precomp_vocab.json'))
    return SimpleNamespace(root=root, data=str(root / 'data'), vocab_path=toy.vocab_path, vocab=vocab,
                           ckpt=str(toy_model / 'checkpoint_0.pth.tar'))


def eval_argv(world, *args, vocab_path=False):
    """evaluation.py's argv on the world's checkpoint; no --vocab_path: the checkpoint stores it."""
    return (['--model_path', world.ckpt, '--data_path', world.data, '--device', 'cpu', *args]
            + (['--vocab_path', world.vocab_path] if vocab_path else []))


def refusal(world, capsys, *args, **kw) -> str:
    """evaluation.main's one-line error; nothing was scored (no 'similarity:' line)."""
    msg = one_line_error(evaluation.main, eval_argv(world, *args, **kw))
    assert 'similarity:' not in capsys.readouterr().out
    return msg


def files_under(folder) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


# ---------------------------------------------------------------- evaluation.py: refused before scoring

@pytest.mark.slow
@pytest.mark.parametrize('split, n', [('odd', 23), ('four', 4)])
def test_fold5_on_a_split_without_5_equal_folds_is_refused_before_scoring(world, tmp_path, capsys, split, n):
    msg = refusal(world, capsys, '--split', split, '--fold5', '--save_sims', str(tmp_path / 'sims.npy'))
    assert msg.startswith('error: --fold5: ') and f'the {split} split has {n} images' in msg
    assert files_under(tmp_path) == []  # no --save_sims file of any fold


@pytest.mark.slow
@pytest.mark.parametrize('value', ['0', '-1', 'nan', 'inf'])
def test_eval_memory_gb_must_be_a_positive_number(world, capsys, value):
    with pytest.raises(SystemExit) as exc:
        evaluation.main(eval_argv(world, '--eval_memory_gb', value))
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert f"argument --eval_memory_gb: expected a positive number, got '{value}'" in err.err
    assert 'similarity:' not in err.out


@pytest.mark.parametrize('value', [0, -1.0, float('nan'), float('inf')])
def test_evalrank_refuses_a_memory_budget_that_is_not_positive(tmp_path, value):
    with pytest.raises(ValueError, match=r'^--eval_memory_gb \S+: expected a positive number$'):  # before any read
        evaluation.evalrank(str(tmp_path / 'absent.pth.tar'), str(tmp_path), 'test', eval_memory_gb=value)


@pytest.mark.slow
def test_output_paths_are_checked_before_scoring(world, tmp_path, capsys):
    plain = tmp_path / 'plain.txt'
    plain.write_text('a file')
    folder = tmp_path / 'existing_folder.npy'
    folder.mkdir()
    cases = [(['--save_sims', str(plain / 'sims.npy')], '--save_sims', str(plain / 'sims.npy')),
             (['--save_sims', str(folder)], '--save_sims', str(folder)),
             (['--examples', '1', '--out', str(plain)], '--out', str(plain)),
             (['--examples', '1', '--out', str(plain / 'report')], '--out', str(plain / 'report'))]
    for args, flag, path in cases:
        msg = refusal(world, capsys, *args)
        assert msg.startswith(f'error: {flag} {path}'), msg
    assert files_under(tmp_path) == ['plain.txt'] and plain.read_text() == 'a file'


@pytest.mark.slow
def test_an_existing_save_sims_file_is_kept_without_overwrite(world, tmp_path, capsys):
    """--save_sims never replaces a score matrix (or its ranks) of an earlier run without --overwrite,
    and says so before scoring."""
    for name in ('a.npy', 'b_ranks.npz'):
        (tmp_path / name).write_bytes(b'earlier')
        msg = refusal(world, capsys, '--save_sims', str(tmp_path / ('a.npy' if name == 'a.npy' else 'b.npy')))
        assert msg == f'error: --save_sims {tmp_path / name} exists: pass --overwrite to replace it, or choose another file'
    assert (tmp_path / 'a.npy').read_bytes() == b'earlier' and (tmp_path / 'b_ranks.npz').read_bytes() == b'earlier'
    evaluation.main(eval_argv(world, '--save_sims', str(tmp_path / 'a.npy'), '--overwrite'))
    assert np.load(tmp_path / 'a.npy').dtype == np.float32


@pytest.mark.slow
def test_every_file_save_sims_and_out_write_is_checked_before_scoring(world, tmp_path, capsys):
    """Not only FILE.npy: its FILE_ranks.npz, the per-fold files of --fold5 and DIR/examples.html."""
    (tmp_path / 'a_ranks.npz').mkdir()
    msg = refusal(world, capsys, '--save_sims', str(tmp_path / 'a.npy'))
    assert msg.startswith('error: --save_sims ') and 'a_ranks.npz' in msg
    (tmp_path / 'b_fold3.npy').mkdir()
    msg = refusal(world, capsys, '--split', 'dev', '--fold5', '--save_sims', str(tmp_path / 'b.npy'))
    assert msg.startswith('error: --save_sims ') and 'b_fold3.npy' in msg
    (tmp_path / 'report' / 'examples.html').mkdir(parents=True)
    msg = refusal(world, capsys, '--examples', '1', '--out', str(tmp_path / 'report'))
    assert msg.startswith('error: --out ') and 'examples.html' in msg
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------- evaluation.py: the stored vocabulary

def swapped_vocab_file(world, folder, i=5, j=6) -> str:
    """The world's vocabulary (same size) with the words of ids i and j swapped."""
    words = world.vocab.words()
    words[i], words[j] = words[j], words[i]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'toy_precomp_vocab.json')
    vocab_lib.serialize_vocab(vocab_lib.Vocabulary.from_words(words), path)
    return path


@pytest.fixture(scope='module')
def with_vocab_path(world):
    """Metrics and printed lines with an explicit --vocab_path, from the usual working directory."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics = evaluation.main(eval_argv(world, vocab_path=True))
    return metrics, out.getvalue()


@pytest.mark.slow
def test_checkpoint_vocabulary_serves_from_another_working_directory(world, with_vocab_path, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A ./vocab holding other ids (the train.py --vocab_path default) is not consulted either.
    swapped_vocab_file(world, tmp_path / 'vocab')
    metrics = evaluation.main(eval_argv(world))
    assert metrics == with_vocab_path[0]
    assert 'rsum:' in capsys.readouterr().out


@pytest.mark.slow
def test_a_vocab_path_with_other_ids_is_refused_naming_the_first_difference(world, tmp_path, capsys):
    path = swapped_vocab_file(world, tmp_path / 'v')
    w5, w6 = world.vocab.idx2word[5], world.vocab.idx2word[6]
    for given in (str(tmp_path / 'v'), path):  # the folder or the file
        msg = refusal(world, capsys, '--vocab_path', given)
        assert msg == (f'error: --vocab_path {path}: id 5 is {w6!r} there but {w5!r} in the vocabulary '
                       f'{world.ckpt} was trained with')


@pytest.mark.slow
def test_authors_checkpoint_without_vocab_path_asks_for_it(world, tmp_path, capsys):
    path = authors_checkpoint(world, world.ckpt, tmp_path / 'authors.pth.tar')
    msg = refusal(world, capsys, '--model_path', path)  # the last --model_path wins
    assert path in msg and 'stores no vocabulary' in msg and 'pass --vocab_path' in msg


# ---------------------------------------------------------------- evaluation.py: features, device

@pytest.mark.slow
def test_features_of_another_width_name_the_features_file(world, tmp_path, capsys):
    src, dst = os.path.join(world.data, 'toy_precomp'), tmp_path / 'toy_precomp'
    dst.mkdir()
    np.save(dst / 'test_ims.npy', np.load(os.path.join(src, 'test_ims.npy'))[:, :, :32])
    shutil.copy(os.path.join(src, 'test_caps.txt'), dst)
    feats = str(dst / 'test_ims.npy')
    msg = refusal(world, capsys, '--data_path', str(tmp_path))
    assert feats in msg and '32-dim' in msg and 'img_dim 64' in msg, msg


@pytest.mark.slow
def test_device_gpu_is_not_a_device(world, capsys):
    msg = refusal(world, capsys, '--device', 'gpu')
    assert msg == 'error: --device gpu: expected cpu, cuda, cuda:N or mps'


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
@pytest.mark.slow
def test_device_cuda_without_cuda_says_so(world, capsys):
    msg = refusal(world, capsys, '--device', 'cuda')
    assert msg.startswith('error: --device cuda: no CUDA device here') and '--device cpu' in msg


# ---------------------------------------------------------------- evaluation.py: progress off a terminal

PAIRS = 20 * 100  # test split: 20 images x 100 captions
NUM = r'[0-9][0-9,.]*[kMG]?'
DURATION = r'\d+ s|\d+ min \d\d s|\d+ h \d\d min'


def metric_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith(('rsum', 'Image to text', 'Text to image'))]


@pytest.mark.slow
def test_progress_lines_on_stderr_metrics_on_stdout_from_another_directory(world, with_vocab_path, tmp_path):
    """A real `python evaluation.py` run, stderr a pipe (no terminal), from an empty working
    directory, without --vocab_path."""
    env = {**os.environ, 'CASC_PROGRESS_SECONDS': '0'}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluation.py'), *eval_argv(world)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    bars = [line for line in proc.stderr.splitlines() if line.startswith('similarity: ')]
    assert len(bars) >= 2, proc.stderr
    for line in bars[:-1]:
        m = re.fullmatch(rf'similarity: ({NUM})/2\.0k pair \((\d+)%\), {NUM} pair/s, (?:{DURATION}) left', line)
        assert m, line
    assert re.fullmatch(rf'similarity: 2\.0k/2\.0k pair \(100%\), {NUM} pair/s, done in (?:{DURATION})', bars[-1])
    percents = [int(re.search(r'\((\d+)%\)', line)[1]) for line in bars]
    assert percents == sorted(percents) and percents[-1] == 100
    out = proc.stdout
    assert re.search(rf'^similarity: {PAIRS} pairs in [0-9.]+ s, \d+ pairs/s$', out, re.M), out
    assert 'left' not in out and 'done in' not in out  # progress stays off stdout
    metrics, expected = metric_lines(out), metric_lines(with_vocab_path[1])
    assert len(metrics) == 3 and metrics == expected
    assert os.listdir(tmp_path) == []  # nothing written into the working directory


# ---------------------------------------------------------------- vocab.py and labels.py: existing files

TRAIN_CAPS = """A man throws a red ball to a dog .
A dog runs on the grass .
A woman rides a bike in the park .
A man and a woman sit on a bench .
A dog catches a ball .
Two children play with a dog in the snow .
A man rides a horse on the beach .
A woman holds a cup of coffee .
A boy kicks a ball in the park .
A zebra stands near a tree .
"""
DEV_CAPS = """A dog jumps over a log .
A man in a hat reads a book .
A girl throws a ball .
A woman walks a dog in the park .
A cat sleeps on a chair .
"""


def caption_folder(root) -> str:
    """root/caps/{train,dev}_caps.txt: 2 + 1 images of 5 hand-written captions (no features)."""
    os.makedirs(root / 'caps', exist_ok=True)
    (root / 'caps' / 'train_caps.txt').write_text(TRAIN_CAPS, encoding='utf-8')
    (root / 'caps' / 'dev_caps.txt').write_text(DEV_CAPS, encoding='utf-8')
    return str(root)


def stat(path):
    return open(path, 'rb').read(), os.stat(path).st_mtime_ns


def cli(mod, tmp_path, *extra):
    return mod.main(['--data_path', caption_folder(tmp_path), '--data_name', 'caps',
                     '--vocab_path', str(tmp_path / 'out'), *extra])


def refused(mod, tmp_path, *extra) -> str:
    return one_line_error(cli, mod, tmp_path, *extra)


def test_vocab_rerun_with_the_same_result_leaves_the_file_as_it_is(tmp_path):
    argv = ['--data_path', caption_folder(tmp_path), '--data_name', 'caps', '--vocab_path', str(tmp_path / 'out')]
    path = vocab_lib.main(argv)
    before = stat(path)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'vocab.py'), *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f'{path} already holds this vocabulary of {len(vocab_lib.deserialize_vocab(path))} ' \
                                  f'words: left as it is'
    assert stat(path) == before


def test_vocab_refuses_to_replace_another_vocabulary_without_overwrite(tmp_path, capsys):
    path = cli(vocab_lib, tmp_path)  # threshold 4
    before = stat(path)
    msg = refused(vocab_lib, tmp_path, '--threshold', '1')  # 'zebra' and more: another vocabulary
    assert path in msg and '--overwrite' in msg
    assert stat(path) == before
    capsys.readouterr()
    cli(vocab_lib, tmp_path, '--threshold', '1', '--overwrite')
    assert 'written to' in capsys.readouterr().out
    words = vocab_lib.deserialize_vocab(path).words()
    assert words == vocab_lib.build_vocab(str(tmp_path), 'caps', threshold=1).words() and 'zebra' in words
    assert files_under(tmp_path / 'out') == ['caps_vocab.json']  # no temporary file left


def test_vocab_refuses_to_replace_a_corrupt_file_without_overwrite(tmp_path):
    os.makedirs(tmp_path / 'out')
    path = tmp_path / 'out' / 'caps_vocab.json'
    path.write_bytes(b'{"word2idx": {"a": 0}, trunc')
    msg = refused(vocab_lib, tmp_path)
    assert str(path) in msg and '--overwrite' in msg
    assert path.read_bytes() == b'{"word2idx": {"a": 0}, trunc'
    cli(vocab_lib, tmp_path, '--overwrite')
    assert vocab_lib.deserialize_vocab(str(path)).words() == vocab_lib.build_vocab(str(tmp_path), 'caps').words()


@pytest.mark.slow
def test_labels_rerun_refusal_and_overwrite(tmp_path, capsys):
    path = cli(labels_lib, tmp_path, '--num_labels', '3')
    before = stat(path)
    capsys.readouterr()
    assert cli(labels_lib, tmp_path, '--num_labels', '3') == path  # the same labels: left as it is
    assert capsys.readouterr().out.strip() == f'{path} already holds these 3 labels: left as it is'
    assert stat(path) == before
    msg = refused(labels_lib, tmp_path, '--num_labels', '5')
    assert path in msg and '--overwrite' in msg and stat(path) == before
    cli(labels_lib, tmp_path, '--num_labels', '5', '--overwrite')
    assert len(labels_lib.load_labels(path)['labels']) == 5
    with open(path, 'w') as f:
        f.write('{"labels": ["dog"]')  # corrupt
    msg = refused(labels_lib, tmp_path, '--num_labels', '5')
    assert path in msg and '--overwrite' in msg
    assert open(path).read() == '{"labels": ["dog"]'
    cli(labels_lib, tmp_path, '--num_labels', '5', '--overwrite')
    assert len(labels_lib.load_labels(path)['labels']) == 5
    assert files_under(tmp_path / 'out') == ['caps_labels.json']


# ---------------------------------------------------------------- vocabularies are checked

def vocab_json(tmp_path, word2idx, idx2word=None, idx=None) -> str:
    idx2word = {str(i): w for w, i in word2idx.items()} if idx2word is None else idx2word
    path = tmp_path / 'bad_vocab.json'
    path.write_text(json.dumps({'word2idx': word2idx, 'idx2word': idx2word,
                                'idx': len(word2idx) if idx is None else idx}))
    return str(path)


SPECIAL_IDS = {w: i for i, w in enumerate(vocab_lib.SPECIALS)}


@pytest.mark.parametrize('case', ['beyond', 'negative', 'idx2word', 'duplicate'])
def test_deserialize_refuses_ids_that_do_not_index_the_embedding(tmp_path, case):
    word2idx = {**SPECIAL_IDS, 'dog': 4, 'cat': 5}
    idx2word = None
    if case == 'beyond':
        word2idx['cat'] = 9  # 6 words: ids must be 0..5
        idx2word = {**{str(i): w for w, i in SPECIAL_IDS.items()}, '4': 'dog', '9': 'cat'}
    elif case == 'negative':
        word2idx['cat'] = -1
    elif case == 'idx2word':
        idx2word = {**{str(i): w for w, i in SPECIAL_IDS.items()}, '4': 'cat', '5': 'dog'}
    else:
        word2idx['cat'] = 4
        word2idx['bird'] = 6  # ids 4, 4, 6 for 7 words
    path = vocab_json(tmp_path, word2idx, idx2word)
    with pytest.raises(ValueError) as exc:
        vocab_lib.deserialize_vocab(path)
    msg = str(exc.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg
    assert re.search(r"word '(cat|dog|bird)'", msg), msg


def test_deserialize_refuses_an_idx_that_disagrees(tmp_path):
    path = vocab_json(tmp_path, {**SPECIAL_IDS, 'dog': 4}, idx=7)
    with pytest.raises(ValueError) as exc:
        vocab_lib.deserialize_vocab(path)
    assert str(exc.value).startswith(f'{path}: ') and 'idx 7' in str(exc.value) and '5 words' in str(exc.value)
    extra = {**{str(i): w for w, i in SPECIAL_IDS.items()}, '4': 'dog', '5': 'ghost'}  # idx2word has one more
    with pytest.raises(ValueError, match=re.escape(path)):
        vocab_lib.deserialize_vocab(vocab_json(tmp_path, {**SPECIAL_IDS, 'dog': 4}, extra))


@pytest.mark.parametrize('name', ['f30k_precomp_vocab.json', 'coco_precomp_vocab.json'])
def test_scan_published_vocabularies_load(name):
    path = shared_path('vocab', name)
    vocab = vocab_lib.deserialize_vocab(path)
    assert vocab.words()[:4] == ['<pad>', '<start>', '<end>', '<unk>']
    assert [vocab(w) for w in vocab_lib.SPECIALS] == [0, 1, 2, 3]
    assert len(vocab) == vocab.idx > 1000 and vocab('dog') > 3


# ---------------------------------------------------------------- caption files are checked

def test_read_captions_names_a_non_utf8_line(tmp_path):
    path = tmp_path / 'train_caps.txt'
    path.write_bytes(b'a dog runs .\na caf\xe9 terrace .\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError) as exc:
        vocab_lib.read_captions(str(path))
    msg = str(exc.value)
    assert msg.startswith(f'{path}: line 2 is not UTF-8') and '\n' not in msg


def test_read_captions_names_an_over_long_line_and_its_length(tmp_path):
    path = tmp_path / 'train_caps.txt'
    path.write_text('a dog runs .\na cat sits .\n' + 'x' * 100_000 + '\n', encoding='utf-8')
    with pytest.raises(ValueError) as exc:
        vocab_lib.read_captions(str(path))
    msg = str(exc.value)
    assert msg.startswith(f'{path}: line 3 has 100,000 characters') and '\n' not in msg and len(msg) < 300


def test_read_captions_reads_crlf_line_ends_and_a_byte_order_mark(tmp_path):
    lf, crlf, bom = tmp_path / 'lf.txt', tmp_path / 'crlf.txt', tmp_path / 'bom.txt'
    lf.write_bytes(b'A dog runs .\nA cat sits .\n')
    crlf.write_bytes(b'A dog runs .\r\nA cat sits .\r\n')
    bom.write_bytes(b'\xef\xbb\xbfA dog runs .\r\nA cat sits .\r\n')  # as Windows Notepad saves UTF-8
    expected = ['A dog runs .', 'A cat sits .']
    assert vocab_lib.read_captions(str(crlf)) == vocab_lib.read_captions(str(lf)) == expected
    assert vocab_lib.read_captions(str(bom)) == expected  # not '\ufeffA dog runs .': 'a' is a known word


SMALL_VOCAB = vocab_lib.Vocabulary.from_words(list(vocab_lib.SPECIALS) + 'a red dog . cat sits'.split())


def precomp_folder(root, caps: bytes, n_img=1):
    os.makedirs(root / 'p', exist_ok=True)
    np.save(root / 'p' / 'train_ims.npy', np.ones((n_img, 2, 4), np.float32))
    (root / 'p' / 'train_caps.txt').write_bytes(caps)
    (root / 'p' / 'dev_caps.txt').write_bytes(b'a dog .\n')
    return str(root / 'p' / 'train_caps.txt')


@pytest.mark.parametrize('caps, says', [(b'a dog .\n\xff\xfe bad\n', 'line 2 is not UTF-8'),
                                        (b'a dog .\n' + b'y' * 100_000 + b'\n', 'line 2 has 100,000 characters')])
def test_dataset_and_vocab_cli_surface_the_caption_error(tmp_path, caps, says):
    path = precomp_folder(tmp_path, caps)
    with pytest.raises(ValueError) as exc:
        data.PrecompDataset(str(tmp_path), 'p', 'train', SMALL_VOCAB)
    assert str(exc.value).startswith(f'{path}: {says}') and '\n' not in str(exc.value)
    msg = one_line_error(vocab_lib.main, ['--data_path', str(tmp_path), '--data_name', 'p', '--vocab_path',
                                          str(tmp_path / 'v')])
    assert msg.startswith(f'error: {path}: {says}')
    assert not os.path.exists(tmp_path / 'v' / 'p_vocab.json')


def test_dataset_reads_crlf_captions_as_lf(tmp_path):
    precomp_folder(tmp_path, b'A red dog .\r\nA cat sits .\r\n', n_img=2)
    crlf = data.PrecompDataset(str(tmp_path), 'p', 'train', SMALL_VOCAB)
    precomp_folder(tmp_path, b'A red dog .\nA cat sits .\n', n_img=2)
    lf = data.PrecompDataset(str(tmp_path), 'p', 'train', SMALL_VOCAB)
    assert crlf.raw_captions == lf.raw_captions == ['A red dog .', 'A cat sits .']
    assert crlf.captions == lf.captions == [[1, 4, 5, 6, 7, 2], [1, 4, 8, 9, 7, 2]]  # no '\r', no <unk> (3)


# ---------------------------------------------------------------- --help of every script

SCRIPTS = ('vocab.py', 'labels.py', 'data.py', 'toy.py', 'train.py', 'evaluation.py', 'bench.py', 'features.py',
           'search.py')


def help_entries(text: str) -> dict:
    """argparse's --help -> {option invocation: its help text on one line}. An entry starts with a
    line indented by exactly two spaces and a dash; its help follows two or more spaces on the
    same line or wraps over the more-indented lines after it."""
    lines = text.splitlines()
    start = next(k for k, line in enumerate(lines) if line in ('options:', 'optional arguments:'))
    entries, current = {}, None
    for line in lines[start + 1:]:
        if re.match(r'^  -', line):
            invocation, _, first = line.strip().partition('  ')
            current = invocation
            entries[current] = [first]
        elif line.startswith('   ') and current:
            entries[current].append(line)
        elif line.strip():
            current = None  # another section
    return {k: ' '.join(' '.join(v).split()) for k, v in entries.items()}


@pytest.fixture(scope='module')
def helps():
    """Each script's `python SCRIPT --help`, run as real processes side by side."""
    procs = {s: subprocess.Popen([sys.executable, os.path.join(ROOT, s), '--help'], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in SCRIPTS}
    return {s: (p.wait(timeout=300), *p.communicate()) for s, p in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_help_states_every_default_once(helps, script):
    rc, out, err = helps[script]
    assert rc == 0 and err == '', err
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script), encoding='utf-8').read()))
    assert doc.splitlines()[0] in out  # the description: the module docstring
    assert '(default: None)' not in out
    entries = help_entries(out)
    usage = out[:out.index('\n\n')]
    flags = lambda text: set(re.findall(r'(?<![\w-])(--?[a-zA-Z][\w-]*)', text))  # noqa: E731
    assert flags(' '.join(entries)) == flags(usage) | {'--help'}  # every option has an entry
    assert len(entries) >= 2  # --help and at least one option (toy.py has only --seed)
    for invocation, text in entries.items():
        if invocation.startswith('-h'):
            continue
        ends = re.findall(r'\((?:default: [^()]*(?:\([^()]*\)[^()]*)*|required)\)', text)
        assert len(ends) == 1 and text.endswith(ends[0]) and len(text) > len(ends[0]) + 2, (invocation, text)


def test_help_entries_parser_reads_wrapped_help():
    text = ('usage: x [-h] --a A [--long_option_name LONG_OPTION_NAME]\n\noptions:\n'
            '  -h, --help            show this help message and exit\n'
            '  --a A                 first line\n'
            '                        (required)\n'
            '  --long_option_name LONG_OPTION_NAME\n'
            '                        words (default:\n'
            '                        2.0)\n')
    assert help_entries(text) == {'-h, --help': 'show this help message and exit', '--a A': 'first line (required)',
                                  '--long_option_name LONG_OPTION_NAME': 'words (default: 2.0)'}


# ---------------------------------------------------------------- the shipped NLTK data

NLTK_RUN = """
import os, sys
sys.path.insert(0, {root!r})
import nltk
# Only NLTK_DATA and HOME (both empty) remain of NLTK's places: system-wide folders are dropped too.
nltk.data.path[:] = [p for p in nltk.data.path if p.startswith((os.environ['NLTK_DATA'], os.environ['HOME']))]
for resource in ('taggers/averaged_perceptron_tagger_eng', 'corpora/stopwords'):
    try:
        nltk.data.find(resource)
        sys.exit('found outside vocab/nltk_data: ' + resource)
    except LookupError:
        pass
import labels
labels.main({argv!r})
"""


@pytest.mark.slow
def test_labels_use_the_shipped_nltk_data(tmp_path):
    (tmp_path / 'nltk_data').mkdir()
    (tmp_path / 'home').mkdir()
    argv = ['--data_path', caption_folder(tmp_path), '--data_name', 'caps', '--vocab_path', str(tmp_path / 'out'),
            '--num_labels', '3']
    env = {**os.environ, 'NLTK_DATA': str(tmp_path / 'nltk_data'), 'HOME': str(tmp_path / 'home')}
    proc = subprocess.run([sys.executable, '-c', NLTK_RUN.format(root=ROOT, argv=argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'downloading' not in proc.stdout + proc.stderr
    assert '3 labels written to' in proc.stdout
    assert labels_lib.load_labels(str(tmp_path / 'out' / 'caps_labels.json'))['labels'][:1] == ['dog']
    assert os.listdir(tmp_path / 'nltk_data') == [] and os.listdir(tmp_path / 'home') == []


# ---------------------------------------------------------------- Ctrl-C

@pytest.mark.slow
@pytest.mark.parametrize('script', ['vocab.py', 'labels.py'])
def test_ctrl_c_while_tokenizing_in_worker_processes_exits_130_at_once_writing_nothing(tmp_path, script):
    """Ctrl-C reaches the whole process group, the worker processes included: one line, exit 130,
    no traceback from any process, the batches not yet started are dropped, no file written."""
    import signal
    import time
    folder = tmp_path / 'big'
    folder.mkdir()
    words = 'dog cat man woman boy girl horse ball tree bench red blue green white'.split()
    rng = np.random.default_rng(0)
    lines = [' '.join(rng.choice(words, 12)) + ' .' for _ in range(120_000)]  # ~40 s of tokenizing on 2 cores
    (folder / 'train_caps.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    (folder / 'dev_caps.txt').write_text('\n'.join(lines[:500]) + '\n', encoding='utf-8')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), '--data_path', str(tmp_path),
                             '--data_name', 'big', '--vocab_path', str(tmp_path / 'out'), '--num_labels', '5'][
                                :None if script == 'labels.py' else -2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, 'CASC_PROGRESS_SECONDS': '0'})
    first = proc.stderr.readline()  # the first progress line: the workers are busy
    assert first.startswith('tokenizing train: '), first
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    err = first + proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 15
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
    assert err.strip().splitlines()[-1] == 'interrupted'
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


# A library each script maps early in its top-level imports, which go on for a while after it: torch's
# Python bindings (a second or more of imports follow) or numpy's core (for the scripts without torch).
IMPORTING = {**{s: 'libtorch_python' for s in ('train.py', 'evaluation.py', 'search.py', 'features.py', 'data.py',
                                               'bench.py', 'report.py')},
             'labels.py': '_multiarray_umath', 'toy.py': '_multiarray_umath'}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='needs /proc to see an import under way')
@pytest.mark.parametrize('script', sorted(IMPORTING))
def test_ctrl_c_while_the_imports_run_is_one_line_and_exit_130(script):
    """Ctrl-C while torch (or numpy) is still importing: 'interrupted' and exit 130, not an import's
    18-line traceback (vocab.py imports nothing slow)."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), '--help'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # until the library is mapped: the import is under way
        with contextlib.suppress(OSError):
            with open(f'/proc/{proc.pid}/maps') as f:
                if IMPORTING[script] in f.read():
                    break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, '', 'interrupted\n')
