"""train.py end to end on toy data: it learns, resumes exactly, writes real checkpoints and
TensorBoard events, and stops with one clear line on bad input."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import labels
import train
import vocab
from conftest import ROOT, SMALL, TOY_MODEL_BATCH, load_checkpoint, one_line_error, train_argv

TRAINING_FIXTURES = {'first'}  # fixtures that train a model: their tests are slow (conftest)


def run_train(toy, name, *extra):
    """train.main on the toy data (conftest) with the SMALL model, into toy.root/name -> (that folder, state)."""
    out = toy.root / name
    return out, train.main(train_argv(toy, out, *extra))


@pytest.fixture(scope='module')
def first(toy):
    """One epoch (20 iterations, validated every 7 and at the end): the run that the checkpoint, log
    and resume tests read."""
    return run_train(toy, 'first', '--num_epochs', '1', '--val_step', '7')[0]


@pytest.mark.slow
def test_training_on_toy_data_learns(toy):
    out, state = run_train(toy, 'learn', '--num_epochs', '4', '--learning_rate', '1e-3', '--batch_size', '40',
                           '--val_step', '1000')
    # chance on 60 dev images: R@1 1.7%, R@5 8%, R@10 17% both ways: rsum ~53
    assert state['best_rsum'] > 250, state
    best = load_checkpoint(out / 'model_best.pth.tar')
    assert best['best_rsum'] == state['best_rsum']


@pytest.mark.slow
def test_checkpoint_holds_everything_and_loads_in_a_fresh_process(toy, first):
    out = first
    path = out / 'checkpoint_0.pth.tar'
    ckpt = load_checkpoint(path)
    assert set(ckpt) >= {'model', 'optimizers', 'epoch', 'Eiters', 'best_rsum', 'opt', 'vocab_size', 'labels'}
    assert ckpt['epoch'] == 1 and ckpt['Eiters'] == 20  # 400 images x 5 captions / batch 100
    assert len(ckpt['optimizers']) == 2 and all(o['state'] for o in ckpt['optimizers'])
    assert isinstance(ckpt['opt'], dict) and ckpt['opt']['embed_size'] == 32
    assert len(ckpt['labels']) == 20 and ckpt['vocab_size'] == len(vocab.deserialize_vocab(
        os.path.join(toy.vocab_path, 'toy_precomp_vocab.json')))
    assert (out / 'model_best.pth.tar').exists()
    assert not [f for f in os.listdir(out) if '.tmp' in f]  # atomic writes leave no temporaries
    code = ('import sys, torch; sys.path.insert(0, sys.argv[2]); import evaluation; '
            'm, opt, lab, _ = evaluation.load_model(sys.argv[1]); print(type(m).__name__, len(lab), opt["num_epochs"])')
    res = subprocess.run([sys.executable, '-c', code, str(path), ROOT], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ['CASC', '20', '1']


@pytest.mark.slow
def test_resume_is_exact(toy, first):
    """2 epochs in one run == 1 epoch, then a resumed second epoch: the same weights, bit for bit."""
    straight, _ = run_train(toy, 'straight', '--num_epochs', '2', '--val_step', '7')
    resumed, state = run_train(toy, 'resumed', '--num_epochs', '2', '--val_step', '7',
                               '--resume', str(first / 'checkpoint_0.pth.tar'))
    a, b = load_checkpoint(straight / 'checkpoint_1.pth.tar'), load_checkpoint(resumed / 'checkpoint_1.pth.tar')
    assert a['Eiters'] == b['Eiters'] == 40 and a['epoch'] == b['epoch'] == 2
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['best_rsum'] == b['best_rsum']
    assert not (resumed / 'checkpoint_0.pth.tar').exists()  # the resumed run started at epoch 1


@pytest.mark.slow
def test_tensorboard_and_text_logs_are_written(first):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = first
    events = EventAccumulator(str(out / 'log'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    for tag in ('train/loss', 'train/hinge', 'train/label_loss', 'train/label_precision', 'train/label_recall',
                'lr/encoders', 'lr/label_head', 'val/rsum', 'val/i2t_r1', 'val/t2i_r10', 'val/t2i_meanr'):
        assert tag in tags, tag
    assert len(events.Scalars('train/loss')) == 4  # log_step 5 over 20 iterations
    log = (out / 'log' / 'train.log').read_text()
    assert 'validation' in log and 'rsum' in log and 'epoch 0 done' in log


@pytest.mark.slow
def test_flags_reach_the_model(toy):
    out, _ = run_train(toy, 'flags', '--num_epochs', '1', '--no-bi_gru', '--no-max_violation', '--cross_attn', 't2i',
                       '--raw_feature_norm', 'softmax', '--precomp_enc_type', 'weight_norm', '--val_step', '1000')
    ckpt = load_checkpoint(out / 'checkpoint_0.pth.tar')
    assert ckpt['opt']['bi_gru'] is False and ckpt['opt']['max_violation'] is False
    assert not any('reverse' in k for k in ckpt['model'])
    assert any('parametrizations' in k for k in ckpt['model'])
    cfg = checkpoint.load_model(str(out / 'checkpoint_0.pth.tar')).model.cfg  # what evaluation rebuilds
    assert (cfg.bi_gru, cfg.max_violation, cfg.cross_attn, cfg.raw_feature_norm, cfg.precomp_enc_type) == \
        (False, False, 't2i', 'softmax', 'weight_norm')


def test_boolean_flags_default_on_and_parse_both_ways():
    args = train.parse_args([])
    assert args.bi_gru and args.max_violation and args.cross_attn == 'all'  # defaults: full CASC
    off = train.parse_args(['--no-max_violation', '--no-bi_gru'])
    assert off.max_violation is False and off.bi_gru is False
    # The authors' flags parse, and switch on what an earlier --no- flag on the same line switched off.
    on = train.parse_args(['--no-max_violation', '--no-bi_gru', '--max_violation', '--bi_gru'])
    assert on.max_violation is True and on.bi_gru is True


def test_learning_rates_follow_the_schedule():
    args = train.parse_args([])
    model = torch.nn.Linear(2, 2)
    opts = [torch.optim.Adam(model.parameters()), torch.optim.Adam(model.parameters())]
    assert train.set_lr(opts, 0, args) == pytest.approx([2e-4, 0.01])
    assert train.set_lr(opts, 15, args) == pytest.approx([2e-5, 0.01 * 0.8 ** 5])
    assert opts[1].param_groups[0]['lr'] == pytest.approx(0.01 * 0.8 ** 5)


def test_missing_vocab_or_labels_give_one_line_errors(toy, tmp_path):
    base = ['--data_path', toy.data, '--data_name', 'toy_precomp', '--logger_name', str(tmp_path / 'l'),
            '--model_name', str(tmp_path / 'm')] + SMALL

    def one_line(*argv) -> str:
        return one_line_error(train.main, base + list(argv))

    assert 'toy_precomp_vocab.json' in one_line('--vocab_path', str(tmp_path / 'nowhere'))
    os.makedirs(tmp_path / 'v')
    vocab.serialize_vocab(vocab.deserialize_vocab(os.path.join(toy.vocab_path, 'toy_precomp_vocab.json')),
                          str(tmp_path / 'v' / 'toy_precomp_vocab.json'))
    assert 'toy_precomp_labels.json' in one_line('--vocab_path', str(tmp_path / 'v'))


def test_resume_with_another_vocabulary_or_label_set_is_refused(toy, toy_model, tmp_path):
    first = toy_model / 'checkpoint_0.pth.tar'
    with pytest.raises(SystemExit) as e:
        train.main(train_argv(toy, tmp_path / 'other_labels', '--num_epochs', 2, '--resume', first, '--num_labels', 10))
    assert 'label' in str(e.value.code) and str(first) in str(e.value.code)
    v = vocab.deserialize_vocab(os.path.join(toy.vocab_path, 'toy_precomp_vocab.json'))
    v.add_word('zebra-striped-word')
    other = tmp_path / 'vocab'
    os.makedirs(other)
    vocab.serialize_vocab(v, str(other / 'toy_precomp_vocab.json'))
    labels.save_labels(labels.load_labels(os.path.join(toy.vocab_path, 'toy_precomp_labels.json')),
                       str(other / 'toy_precomp_labels.json'))
    with pytest.raises(SystemExit) as e:
        train.main(['--data_path', toy.data, '--data_name', 'toy_precomp', '--vocab_path', str(other),
                    '--logger_name', str(tmp_path / 'l'), '--model_name', str(tmp_path / 'm'), '--resume', str(first),
                    '--num_epochs', '2'] + SMALL)
    msg = str(e.value.code)
    assert 'vocabulary' in msg and str(first) in msg and str(other / 'toy_precomp_vocab.json') in msg
    assert f"id {len(v) - 1} is 'zebra-striped-word' there but missing" in msg


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy, toy_model, tmp_path):
    good = shutil.copytree(toy_model, tmp_path / 'good')  # the toy model's run (1 epoch of 2000 pairs)
    before = {f: (good / f).read_bytes() for f in os.listdir(good) if f.endswith('.pth.tar')}
    with pytest.raises(SystemExit) as e:  # a margin beyond float32 (inf there) makes the very first loss inf
        train.main(train_argv(toy, good, '--batch_size', TOY_MODEL_BATCH, '--num_epochs', 2, '--margin', '1e39',
                              '--resume', good / 'checkpoint_0.pth.tar'))
    msg = str(e.value.code)
    assert f'non-finite loss at iteration {2000 // TOY_MODEL_BATCH + 1}' in msg and 'epoch 1' in msg and str(good) in msg
    after = {f: (good / f).read_bytes() for f in os.listdir(good) if f.endswith('.pth.tar')}
    assert after == before
    assert 'non-finite loss' in (good / 'log' / 'train.log').read_text()
