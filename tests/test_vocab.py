"""vocab.py on real data: SCAN's published Flickr30K vocabulary and real Flickr30K captions."""
import json
import os
import shutil
from collections import Counter

import pytest
from conftest import ROOT, SHARED, shared_path

import vocab as V

SCAN_VOCAB_SIZE = 8481  # len of SCAN's vocab/f30k_precomp_vocab.json
SCAN_F30K = os.path.join(ROOT, 'vocab', 'f30k_precomp_vocab.json')  # shipped: SCAN's file, byte for byte (tested)


def caption_folder(root, n=None):
    """root/f30k/{train,dev}_caps.txt = the real dev/test captions (first n lines of each if n)."""
    src = shared_path('data', 'f30k_precomp')
    os.makedirs(root / 'f30k', exist_ok=True)
    for split, real in (('train', 'dev'), ('dev', 'test')):
        if n is None:
            shutil.copy(os.path.join(src, f'{real}_caps.txt'), root / 'f30k' / f'{split}_caps.txt')
        else:
            lines = V.read_captions(os.path.join(src, f'{real}_caps.txt'))[:n]
            (root / 'f30k' / f'{split}_caps.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return root


@pytest.fixture(scope='module')
def scan_vocab():
    return V.deserialize_vocab(SCAN_F30K)


@pytest.mark.parametrize('name, size, example', [('f30k_precomp', SCAN_VOCAB_SIZE, 'raining'),
                                                 ('coco_precomp', 11353, 'wrought-iron')])
def test_shipped_scan_vocabularies_load_with_scan_ids(name, size, example):
    """vocab/ ships SCAN's published vocabularies (their download link is dead), so the default
    --vocab_path vocab works for people who hold SCAN's features."""
    vocab = V.deserialize_vocab(os.path.join(ROOT, 'vocab', f'{name}_vocab.json'))
    assert len(vocab) == vocab.idx == size
    assert vocab.words()[:5] == [*V.SPECIALS, example]  # SCAN's special ids 0-3, then its own order
    assert vocab('notaword-xyz') == 3 and vocab.idx2word[vocab('dog')] == 'dog'
    scan = os.path.join(SHARED, 'vocab', f'{name}_vocab.json')  # in CI; a user's clone has no ../shared
    if os.path.exists(scan):
        with open(os.path.join(ROOT, 'vocab', f'{name}_vocab.json'), 'rb') as f, open(scan, 'rb') as g:
            assert f.read() == g.read()  # byte for byte SCAN's file


def test_scan_vocab_loads_with_its_ids(scan_vocab):
    assert len(scan_vocab) == scan_vocab.idx == SCAN_VOCAB_SIZE
    assert [scan_vocab.idx2word[i] for i in range(4)] == list(V.SPECIALS)
    assert all(scan_vocab.idx2word[i] == w for w, i in scan_vocab.word2idx.items())
    assert sorted(scan_vocab.idx2word) == list(range(SCAN_VOCAB_SIZE))
    for w in ('a', 'man', 'dog', 'shirt'):
        assert scan_vocab.idx2word[scan_vocab(w)] == w and scan_vocab(w) > 3
    assert scan_vocab('notaword-xyz') == 3


def test_serialize_round_trip_keeps_scan_format(scan_vocab, tmp_path):
    path = str(tmp_path / 'v.json')
    V.serialize_vocab(scan_vocab, path)
    with open(path) as f, open(SCAN_F30K) as g:
        assert json.load(f) == json.load(g)  # string idx2word keys, same ids, same idx
    again = V.deserialize_vocab(path)
    assert (again.word2idx, again.idx2word, again.idx) == (scan_vocab.word2idx, scan_vocab.idx2word, scan_vocab.idx)
    assert not [p for p in os.listdir(tmp_path) if p != 'v.json']  # no temporary file left behind


def test_build_vocab_keeps_every_word_with_count_at_least_4(tmp_path):
    from nltk.tokenize import word_tokenize
    root = caption_folder(tmp_path, n=1000)  # 2,000 real captions: the rule does not depend on the size
    counter = Counter()  # independent count, straight from the spec's tokenizer definition
    for split in ('train', 'dev'):
        for line in (root / 'f30k' / f'{split}_caps.txt').read_text(encoding='utf-8').splitlines():
            counter.update(word_tokenize(line.strip().lower(), preserve_line=True))
    vocab = V.build_vocab(str(root), 'f30k')
    assert [vocab.idx2word[i] for i in range(4)] == list(V.SPECIALS)
    assert set(vocab.word2idx) - set(V.SPECIALS) == {w for w, c in counter.items() if c >= 4}
    assert sorted(vocab.idx2word) == list(range(len(vocab)))
    assert vocab.idx2word[4] == counter.most_common(1)[0][0]  # most frequent word first


def test_cli_writes_the_vocab_file(tmp_path):
    root = caption_folder(tmp_path / 'data', n=200)
    out = V.main(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(tmp_path / 'vocab')])
    assert out == str(tmp_path / 'vocab' / 'f30k_vocab.json')
    assert V.deserialize_vocab(out).word2idx == V.build_vocab(str(root), 'f30k').word2idx


def test_cli_says_how_many_words_fall_under_the_threshold_and_how_to_keep_them(tmp_path, capsys):
    from nltk.tokenize import word_tokenize
    root = caption_folder(tmp_path / 'data', n=90)  # a new user's small set: 18 real images
    counter = Counter()  # independent count, straight from the tokenizer's definition
    for split in ('train', 'dev'):
        for line in (root / 'f30k' / f'{split}_caps.txt').read_text(encoding='utf-8').splitlines():
            counter.update(word_tokenize(line.strip().lower(), preserve_line=True))
    rare = sorted((w for w, c in counter.items() if c < 4), key=lambda w: (-counter[w], w))
    argv = ['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(tmp_path / 'vocab')]
    out = V.main(argv)
    top = ', '.join(f'{w} ({counter[w]})' for w in rare[:5])
    assert (f'{len(rare)} of {len(counter)} distinct words are seen fewer than --threshold 4 times and left out '
            f'(read as <unk>), most frequent first: {top}; --threshold 1 keeps every word') in capsys.readouterr().out
    assert not set(rare) & set(V.deserialize_vocab(out).word2idx)
    V.main(argv + ['--threshold', '1', '--overwrite'])
    printed = capsys.readouterr().out
    assert 'fewer than --threshold' not in printed and f'vocabulary of {len(counter) + 4} words' in printed
    assert set(rare) <= set(V.deserialize_vocab(out).word2idx)


def test_missing_caption_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='train_caps.txt'):
        V.build_vocab(str(tmp_path), 'f30k')
    with pytest.raises(SystemExit, match='^error: caption file not found: .*train_caps.txt'):
        V.main(['--data_path', str(tmp_path), '--data_name', 'f30k', '--vocab_path', str(tmp_path)])


def test_empty_caption_line_names_file_and_line(tmp_path):
    path = tmp_path / 'train_caps.txt'
    path.write_text('a dog runs .\na man sits .\n  \na cat .\n', encoding='utf-8')
    with pytest.raises(ValueError, match=f'{path}: line 3 '):
        V.read_captions(str(path))


@pytest.mark.parametrize('text', ['not json', '[1, 2]', '{"word2idx": {"a": 0}}',
                                  '{"word2idx": {"a": 0}, "idx2word": {"0": "a"}, "idx": 1}'])
def test_bad_vocab_file_is_named(tmp_path, text):
    path = tmp_path / 'bad_vocab.json'
    path.write_text(text)
    with pytest.raises(ValueError, match='bad_vocab.json'):
        V.deserialize_vocab(str(path))
    with pytest.raises(FileNotFoundError, match='vocab.py'):
        V.deserialize_vocab(str(tmp_path / 'absent.json'))


def test_encode_adds_start_end_and_maps_unknown(scan_vocab):
    tokens = V.tokenize('A Dog jumps over the xyzzyq-fence.')
    assert tokens == ['a', 'dog', 'jumps', 'over', 'the', 'xyzzyq-fence', '.']
    ids = V.encode(scan_vocab, tokens)
    assert ids[0] == 1 and ids[-1] == 2 and ids[6] == 3
    assert [scan_vocab.idx2word[i] for i in ids[1:6]] == tokens[:5]


def test_parallel_tokenizing_equals_one_process():
    """map_batches over worker processes returns every batch, in order, as one process would."""
    caps = V.read_captions(shared_path('data', 'f30k_precomp', 'test_caps.txt'))[:600]
    parts = list(V.map_batches(V._tokenize_batch, caps, 'test', workers=2, batch=100))
    assert len(parts) == 6 and [t for part in parts for t in part] == [V.tokenize(c) for c in caps]
    assert V.tokenize_all(caps, workers=1) == [V.tokenize(c) for c in caps]
