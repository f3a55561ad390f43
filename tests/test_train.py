"""train.py end to end on toy data: it learns, resumes exactly, writes real checkpoints and
TensorBoard events, and stops with one clear line on bad input."""
import os
import subprocess
import sys

import pytest
import torch

import data
import labels
import train
import vocab
from conftest import ROOT

SIZES = {'train': 400, 'dev': 60, 'test': 40, 'testall': 50}
SMALL = ['--img_dim', '64', '--embed_size', '32', '--word_dim', '16', '--num_labels', '20',
         '--label_hidden', '16', '--batch_size', '100', '--workers', '0', '--log_step', '5']


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A small toy precomp folder with its vocabulary and labels -> (root, common train args)."""
    root = tmp_path_factory.mktemp('toy')
    data.make_toy(str(root / 'data'), sizes=SIZES)
    common = ['--data_path', str(root / 'data'), '--data_name', 'toy_precomp', '--vocab_path', str(root / 'vocab')]
    vocab.main(common)
    labels.main(common + ['--num_labels', '20'])
    return root, common


def run_train(toy, name, *extra):
    root, common = toy
    out = root / name
    state = train.main(common + SMALL + ['--logger_name', str(out / 'log'), '--model_name', str(out)] + list(extra))
    return out, state


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.mark.slow
def test_training_on_toy_data_learns(toy):
    out, state = run_train(toy, 'learn', '--num_epochs', '4', '--learning_rate', '1e-3', '--batch_size', '40',
                           '--val_step', '1000')
    # chance on 60 dev images: R@1 1.7%, R@5 8%, R@10 17% both ways: rsum ~53
    assert state['best_rsum'] > 250, state
    best = load(out / 'model_best.pth.tar')
    assert best['best_rsum'] == state['best_rsum']


def test_checkpoint_holds_everything_and_loads_in_a_fresh_process(toy):
    out, _ = run_train(toy, 'ckpt', '--num_epochs', '1', '--val_step', '4')
    path = out / 'checkpoint_0.pth.tar'
    ckpt = load(path)
    assert set(ckpt) >= {'model', 'optimizers', 'epoch', 'Eiters', 'best_rsum', 'opt', 'vocab_size', 'labels'}
    assert ckpt['epoch'] == 1 and ckpt['Eiters'] == 20  # 400 images x 5 captions / batch 100
    assert len(ckpt['optimizers']) == 2 and all(o['state'] for o in ckpt['optimizers'])
    assert isinstance(ckpt['opt'], dict) and ckpt['opt']['embed_size'] == 32
    assert len(ckpt['labels']) == 20 and ckpt['vocab_size'] == len(vocab.deserialize_vocab(
        os.path.join(toy[1][5], 'toy_precomp_vocab.json')))
    assert (out / 'model_best.pth.tar').exists()
    assert not [f for f in os.listdir(out) if '.tmp' in f]  # atomic writes leave no temporaries
    code = ('import sys, torch; sys.path.insert(0, sys.argv[2]); import evaluation; '
            'm, opt, lab, _ = evaluation.load_model(sys.argv[1]); print(type(m).__name__, len(lab), opt["num_epochs"])')
    res = subprocess.run([sys.executable, '-c', code, str(path), ROOT], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ['CASC', '20', '1']


def test_resume_is_exact(toy):
    """2 epochs in one run == 1 epoch, then a resumed second epoch: the same weights, bit for bit."""
    straight, _ = run_train(toy, 'straight', '--num_epochs', '2', '--val_step', '7')
    first, _ = run_train(toy, 'first', '--num_epochs', '1', '--val_step', '7')
    resumed, state = run_train(toy, 'resumed', '--num_epochs', '2', '--val_step', '7',
                               '--resume', str(first / 'checkpoint_0.pth.tar'))
    a, b = load(straight / 'checkpoint_1.pth.tar'), load(resumed / 'checkpoint_1.pth.tar')
    assert a['Eiters'] == b['Eiters'] == 40 and a['epoch'] == b['epoch'] == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['best_rsum'] == b['best_rsum']
    assert not (resumed / 'checkpoint_0.pth.tar').exists()  # the resumed run started at epoch 1


def test_tensorboard_and_text_logs_are_written(toy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = run_train(toy, 'logs', '--num_epochs', '1', '--val_step', '1000')
    events = EventAccumulator(str(out / 'log'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    for tag in ('train/loss', 'train/hinge', 'train/label_loss', 'train/label_precision', 'train/label_recall',
                'lr/encoders', 'lr/label_head', 'val/rsum', 'val/i2t_r1', 'val/t2i_r10', 'val/t2i_meanr'):
        assert tag in tags, tag
    assert len(events.Scalars('train/loss')) == 4  # log_step 5 over 20 iterations
    log = (out / 'log' / 'train.log').read_text()
    assert 'validation' in log and 'rsum' in log and 'epoch 0 done' in log


def test_flags_reach_the_model(toy):
    out, _ = run_train(toy, 'flags', '--num_epochs', '1', '--no-bi_gru', '--no-max_violation', '--cross_attn', 't2i',
                       '--raw_feature_norm', 'softmax', '--precomp_enc_type', 'weight_norm', '--val_step', '1000')
    ckpt = load(out / 'checkpoint_0.pth.tar')
    assert ckpt['opt']['bi_gru'] is False and ckpt['opt']['max_violation'] is False
    assert not any('reverse' in k for k in ckpt['model'])
    assert any('parametrizations' in k for k in ckpt['model'])
    args = train.parse_args([])
    assert args.bi_gru and args.max_violation and args.cross_attn == 'all'  # defaults: full CASC
    assert train.parse_args(['--max_violation', '--bi_gru']).max_violation  # the authors' flags parse


def test_learning_rates_follow_the_schedule():
    args = train.parse_args([])
    model = torch.nn.Linear(2, 2)
    opts = [torch.optim.Adam(model.parameters()), torch.optim.Adam(model.parameters())]
    assert train.set_lr(opts, 0, args) == pytest.approx([2e-4, 0.01])
    assert train.set_lr(opts, 15, args) == pytest.approx([2e-5, 0.01 * 0.8 ** 5])
    assert opts[1].param_groups[0]['lr'] == pytest.approx(0.01 * 0.8 ** 5)


def test_missing_vocab_or_labels_give_one_line_errors(toy, tmp_path):
    root, common = toy
    base = ['--data_path', str(root / 'data'), '--data_name', 'toy_precomp', '--logger_name', str(tmp_path / 'l'),
            '--model_name', str(tmp_path / 'm')] + SMALL
    with pytest.raises(SystemExit) as e:
        train.main(base + ['--vocab_path', str(tmp_path / 'nowhere')])
    assert 'toy_precomp_vocab.json' in str(e.value.code) and '\n' not in str(e.value.code)
    os.makedirs(tmp_path / 'v')
    vocab.serialize_vocab(vocab.deserialize_vocab(os.path.join(common[5], 'toy_precomp_vocab.json')),
                          str(tmp_path / 'v' / 'toy_precomp_vocab.json'))
    with pytest.raises(SystemExit) as e:
        train.main(base + ['--vocab_path', str(tmp_path / 'v')])
    assert 'toy_precomp_labels.json' in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.main(base + ['--vocab_path', common[5], '--num_labels', '999'])
    assert '--num_labels 999' in str(e.value.code)


def test_resume_with_another_vocabulary_or_label_set_is_refused(toy, tmp_path):
    root, common = toy
    first = root / 'first' / 'checkpoint_0.pth.tar'
    if not first.exists():
        run_train(toy, 'first', '--num_epochs', '1', '--val_step', '7')
    with pytest.raises(SystemExit) as e:
        run_train(toy, 'other_labels', '--num_epochs', '2', '--resume', str(first), '--num_labels', '10')
    assert 'label' in str(e.value.code) and str(first) in str(e.value.code)
    v = vocab.deserialize_vocab(os.path.join(common[5], 'toy_precomp_vocab.json'))
    v.add_word('zebra-striped-word')
    other = tmp_path / 'vocab'
    os.makedirs(other)
    vocab.serialize_vocab(v, str(other / 'toy_precomp_vocab.json'))
    labels.save_labels(labels.load_labels(os.path.join(common[5], 'toy_precomp_labels.json')),
                       str(other / 'toy_precomp_labels.json'))
    with pytest.raises(SystemExit) as e:
        train.main(['--data_path', str(root / 'data'), '--data_name', 'toy_precomp', '--vocab_path', str(other),
                    '--logger_name', str(tmp_path / 'l'), '--model_name', str(tmp_path / 'm'), '--resume', str(first),
                    '--num_epochs', '2'] + SMALL)
    msg = str(e.value.code)
    assert 'vocabulary' in msg and str(first) in msg and str(other / 'toy_precomp_vocab.json') in msg
    assert f"id {len(v) - 1} is 'zebra-striped-word' there but missing" in msg


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy):
    root, _ = toy
    good, _ = run_train(toy, 'good', '--num_epochs', '1', '--val_step', '1000')
    before = {f: (good / f).read_bytes() for f in os.listdir(good) if f.endswith('.pth.tar')}
    with pytest.raises(SystemExit) as e:  # an infinite margin makes the very first loss inf
        run_train(toy, 'good', '--num_epochs', '2', '--margin', 'inf', '--resume', str(good / 'checkpoint_0.pth.tar'))
    msg = str(e.value.code)
    assert 'non-finite loss at iteration 21' in msg and 'epoch 1' in msg and str(good) in msg
    after = {f: (good / f).read_bytes() for f in os.listdir(good) if f.endswith('.pth.tar')}
    assert after == before
    assert 'non-finite loss' in (good / 'log' / 'train.log').read_text()
