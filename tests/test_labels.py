"""labels.py: the label set from real Flickr30K captions, targets, pos_weight, file I/O, CLI."""
import json
import os
from collections import Counter

import numpy as np
import pytest

from test_vocab import caption_folder

import labels as LB
from vocab import main as vocab_main
from vocab import read_captions, tokenize


@pytest.fixture(scope='module')
def real(tmp_path_factory):
    """Labels built from a folder whose train/dev captions are the real dev/test captions."""
    root = caption_folder(tmp_path_factory.mktemp('data'))
    tokens = {s: [tokenize(c) for c in read_captions(str(root / 'f30k' / f'{s}_caps.txt'))]
              for s in ('train', 'dev')}
    return LB.build_labels(str(root), 'f30k', num_labels=500), tokens


@pytest.mark.slow
def test_labels_are_the_most_frequent_non_stop_word_nouns(real):
    import nltk
    LB.use_shipped_nltk()
    from nltk.corpus import stopwords
    d, tokens = real
    stop = set(stopwords.words('english'))
    # Independent count with NLTK's public pos_tag_sents, straight from the spec's rule.
    tagged = nltk.pos_tag_sents(tokens['train'] + tokens['dev'])
    nouns = Counter(w for sent in tagged for w, tag in sent if tag.startswith('NN') and w not in stop)
    expected = sorted(nouns.items(), key=lambda wc: (-wc[1], wc[0]))[:500]
    assert list(zip(d['labels'], d['counts'])) == expected
    assert not stop & set(d['labels'])
    assert {'man', 'woman', 'shirt', 'dog'} <= set(d['labels'][:20])
    assert d['splits'] == ['train', 'dev'] and d['num_images'] == 1014 and len(d['pos_weight']) == 500


@pytest.mark.slow
def test_pos_weight_of_real_labels_counts_training_images(real):
    d, tokens = real
    caps = tokens['train']
    n_man = sum(any('man' in caps[5 * i + j] for j in range(5)) for i in range(len(caps) // 5))
    assert 0 < n_man < 1014
    assert d['pos_weight'][d['labels'].index('man')] == pytest.approx((1014 - n_man) / n_man, rel=1e-6)


def test_targets_are_the_union_over_an_image_captions():
    caps = [['a', 'dog', 'runs'], ['a', 'dog'], ['dog', 'on', 'grass'], ['the', 'animal'], ['dog', 'dog'],
            ['a', 'man', 'with', 'a', 'ball'], ['man'], ['ball'], ['man', 'throws'], ['the', 'cat', 'sits']]
    labels = ['man', 'dog', 'grass', 'ball', 'cat', 'car']
    targets = LB.image_targets(caps, labels, caps_per_image=5)
    assert targets.dtype == np.float32 and targets.shape == (2, 6)
    np.testing.assert_array_equal(targets, [[0, 1, 1, 0, 0, 0], [1, 0, 0, 1, 1, 0]])
    np.testing.assert_array_equal(LB.image_targets(caps[:3], labels, 1), [[0, 1, 0, 0, 0, 0]] * 2 + [[0, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match='multiple of 5'):
        LB.image_targets(caps[:7], labels, 5)


def test_pos_weight_formula():
    targets = np.array([[1, 0, 0, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    w = LB.pos_weight(targets)  # n_img = 4, n_k = [3, 2, 0, 1]
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [1 / 3, 1, 1, 3])


def test_caps_per_image_reads_the_feature_count(tmp_path):
    np.save(tmp_path / 'train_ims.npy', np.zeros((2, 1, 3), np.float32))
    assert LB.caps_per_image(str(tmp_path), 'train', 10) == 5
    assert LB.caps_per_image(str(tmp_path), 'train', 2) == 1
    with pytest.raises(ValueError, match='train_ims.npy'):
        LB.caps_per_image(str(tmp_path), 'train', 7)
    assert LB.caps_per_image(str(tmp_path), 'dev', 15) == 5  # no dev_ims.npy: assume 5
    with pytest.raises(ValueError, match='multiple of 5'):
        LB.caps_per_image(str(tmp_path), 'dev', 14)


def test_more_labels_than_nouns_gives_all_nouns_and_none_is_refused(tmp_path):
    os.makedirs(tmp_path / 'toy')
    for split in ('train', 'dev'):
        (tmp_path / 'toy' / f'{split}_caps.txt').write_text('a dog on the grass .\n' * 5, encoding='utf-8')
    assert LB.build_labels(str(tmp_path), 'toy', num_labels=1)['labels'] == ['dog']
    assert LB.build_labels(str(tmp_path), 'toy', num_labels=3)['labels'] == ['dog', 'grass']
    with pytest.raises(ValueError, match='^--num_labels 0: need at least 1 label$'):
        LB.build_labels(str(tmp_path), 'toy', num_labels=0)
    for split in ('train', 'dev'):
        (tmp_path / 'toy' / f'{split}_caps.txt').write_text('it is so .\n' * 5, encoding='utf-8')
    with pytest.raises(ValueError, match='toy: no nouns in the train and dev captions.*--num_labels 0'):
        LB.build_labels(str(tmp_path), 'toy')


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """A new user's small set: the first 18 images of the real dev and test captions (90 lines each),
    its vocabulary, and its nouns counted independently with NLTK's public pos_tag_sents."""
    import nltk
    from nltk.corpus import stopwords
    root = caption_folder(tmp_path_factory.mktemp('small'), n=90)
    LB.use_shipped_nltk()
    stop = set(stopwords.words('english'))
    sents = [tokenize(c) for s in ('train', 'dev') for c in read_captions(str(root / 'f30k' / f'{s}_caps.txt'))]
    nouns = {w for sent in nltk.pos_tag_sents(sents) for w, tag in sent if tag.startswith('NN') and w not in stop}
    vocab_main(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(root / 'vocab')])
    return root, nouns


def test_default_num_labels_on_a_small_real_set_uses_all_nouns_and_says_so(small, capsys):
    root, nouns = small
    assert 100 < len(nouns) < 500  # fewer than the default --num_labels
    out = LB.main(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(root / 'vocab')])
    d = LB.load_labels(out)
    assert set(d['labels']) == nouns and len(d['pos_weight']) == len(nouns) and d['num_images'] == 18
    printed = capsys.readouterr().out
    assert (f'only {len(nouns)} nouns in the train and dev captions, fewer than --num_labels 500: '
            f'using all {len(nouns)} as labels') in printed
    assert f'{len(nouns)} labels written to {out}' in printed


def test_train_with_its_default_num_labels_takes_a_smaller_labels_file(small, capsys):
    """The README's own-images commands, as written: labels.py and train.py, both without --num_labels."""
    import train
    root, nouns = small
    LB.main(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(root / 'vocab')])
    capsys.readouterr()
    args = train.parse_args(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(root / 'vocab')])
    assert args.num_labels == 500
    vocab, words, pos_weight = train.load_vocab_and_labels(args)
    path = os.path.join(str(root / 'vocab'), 'f30k_labels.json')
    assert words == LB.load_labels(path)['labels'] and pos_weight.shape == (len(nouns),)
    assert args.num_labels == len(nouns)  # the head's K, as the checkpoint will record it
    assert f'{path} holds {len(nouns)} labels, fewer than --num_labels 500: using all {len(nouns)}' in capsys.readouterr().out
    args = train.parse_args(['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(root / 'vocab'),
                             '--num_labels', '7'])
    assert train.load_vocab_and_labels(args)[1] == words[:7] and args.num_labels == 7


def test_save_load_round_trip(tmp_path):
    d = {'labels': ['man', 'dog'], 'counts': [5, 3], 'pos_weight': [0.5, 2.0], 'num_images': 3,
         'splits': ['train', 'dev']}
    path = str(tmp_path / 'x_labels.json')
    LB.save_labels(d, path)
    assert LB.load_labels(path) == d and os.listdir(tmp_path) == ['x_labels.json']


@pytest.mark.parametrize('text', ['not json', '["man"]', '{"labels": ["man"], "pos_weight": [1.0]}',
                                  '{"labels": ["man", 3], "counts": [1, 1], "pos_weight": [1, 1], "num_images": 1, "splits": []}',
                                  '{"labels": ["man"], "counts": [1], "pos_weight": [1, 1], "num_images": 1, "splits": []}'])
def test_load_labels_rejects_a_bad_file_naming_it(tmp_path, text):
    path = tmp_path / 'bad_labels.json'
    path.write_text(text)
    with pytest.raises(ValueError, match='bad_labels.json'):
        LB.load_labels(str(path))
    with pytest.raises(FileNotFoundError, match='absent.json.*labels.py'):
        LB.load_labels(str(tmp_path / 'absent.json'))


def test_cli_writes_the_labels_json(tmp_path, capsys):
    root = caption_folder(tmp_path / 'data', n=200)
    argv = ['--data_path', str(root), '--data_name', 'f30k', '--vocab_path', str(tmp_path / 'vocab')]
    out = LB.main(argv + ['--num_labels', '20'])
    assert out == str(tmp_path / 'vocab' / 'f30k_labels.json')
    with open(out) as f:
        d = json.load(f)
    assert sorted(d) == sorted(LB.KEYS) and len(d['labels']) == len(d['pos_weight']) == 20
    assert d['num_images'] == 40
    assert '20 labels written' in capsys.readouterr().out
    LB.main(argv + ['--num_labels', '100000', '--overwrite'])
    with open(out) as f:
        n = len(json.load(f)['labels'])
    assert 20 < n < 100000 and f'fewer than --num_labels 100000: using all {n} as labels' in capsys.readouterr().out


def test_ensure_nltk_offline_raises_one_clear_line(tmp_path, monkeypatch, capsys):
    import nltk
    monkeypatch.setenv('NLTK_DATA', str(tmp_path))
    monkeypatch.setattr(nltk.data, 'path', [str(tmp_path)])
    monkeypatch.setattr(LB, 'SHIPPED_NLTK', str(tmp_path / 'not_shipped'))
    calls = []
    monkeypatch.setattr(nltk, 'download', lambda name, **kw: calls.append(name) or False)
    with pytest.raises(OSError) as e:
        LB.ensure_nltk()
    msg = str(e.value)
    assert '\n' not in msg and 'NLTK_DATA' in msg
    assert 'averaged_perceptron_tagger_eng' in msg and 'stopwords' in msg
    assert calls == ['averaged_perceptron_tagger_eng', 'stopwords']  # each tried once
    assert capsys.readouterr().out.count('downloading') == 2
