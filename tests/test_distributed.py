"""Several processes (parallel.py): the global batches, the loss and its gradients, training,
resuming and evaluation under torchrun (gloo on these CPUs) equal one process's; only rank 0
writes; a failing rank ends the run."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import parallel
from conftest import ROOT, load_checkpoint, toy_world

WORKER = os.path.join(ROOT, 'tests', 'dist_worker.py')
SIZES = {'train': 101, 'dev': 20, 'test': 20, 'testall': 20}  # 505 pairs: the last batch of 64 has 57
SMALL = ['--img_dim', '64', '--embed_size', '32', '--word_dim', '16', '--num_labels', '20', '--label_hidden', '16',
         '--batch_size', '64', '--workers', '0', '--log_step', '2', '--val_step', '1000']


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
           '--monitor_interval', '0.5', *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def python(*args, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# The global batches -------------------------------------------------------------------------------

def batches(n, batch_size, seed, world, epoch=0):
    """Every process's batches of one epoch, zipped: [[rank 0's, rank 1's, ...], ...]."""
    samplers = [parallel.GlobalBatchSampler(n, batch_size, seed, r, world) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(step) for step in zip(*samplers)]


@pytest.mark.parametrize('world,batch_size', [(2, 64), (3, 60), (4, 64)])
def test_the_processes_share_out_the_single_process_batches(world, batch_size):
    one = [b[0] for b in batches(505, batch_size, seed=3, world=1)]
    many = batches(505, batch_size, seed=3, world=world)
    assert len(one) == len(many) == -(-505 // batch_size) and sorted(sum(one, [])) == list(range(505))
    for single, shares in zip(one, many):
        assert sum(shares, []) == single  # contiguous shares, in rank order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # the last batch as even as can be
    assert [len(s) for s in many[-1]] == parallel.shares(505 % batch_size, world)


def test_the_shuffle_is_a_function_of_seed_and_epoch():
    first = batches(505, 64, seed=0, world=1)
    assert batches(505, 64, seed=0, world=1) == first
    assert batches(505, 64, seed=0, world=1, epoch=1) != first
    assert batches(505, 64, seed=1, world=1) != first


def test_batch_sizes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match=r'--batch_size 63: not divisible by the 2 processes'):
        parallel.GlobalBatchSampler(505, 63, 0, 0, 2)
    with pytest.raises(ValueError, match=r'the last global batch of the 505 training pairs has 1, fewer than the 4'):
        parallel.GlobalBatchSampler(505, 8, 0, 0, 4)


def test_one_process_runs_without_a_process_group():
    assert not parallel.launched() and parallel.world() == 1 and parallel.rank() == 0
    t = torch.arange(3.0)
    assert parallel.sum_to_main(t, 'cpu') is t and parallel.broadcast({'a': 1}) == {'a': 1}


# The loss and its gradients ------------------------------------------------------------------------

@pytest.mark.slow
def test_gradients_of_three_processes_equal_one_process_in_float64(tmp_path):
    """A global batch of 7 pairs (shares 3, 2, 2; captions padded to each share's own longest):
    the loss and every parameter's gradient equal the single-process ones to 1e-12."""
    sys.path.insert(0, os.path.dirname(WORKER))
    import dist_worker
    check(torchrun(3, WORKER, 'grads', str(tmp_path / 'grads.pt')))
    got = load_checkpoint(tmp_path / 'grads.pt')
    loss, grads = dist_worker.step(*dist_worker.global_batch())
    assert got['loss'].item() == pytest.approx(loss.item(), rel=1e-13, abs=0)
    assert got['grads'].keys() == grads.keys()
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got['grads'][name], g, rtol=0, atol=1e-12, msg=name)


# Training, resuming, evaluating ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A: python train.py, 2 epochs. B: torchrun 2 processes, 1 epoch. C: torchrun 2 processes
    resuming A's first checkpoint to 2 epochs. Same seed and flags, global batch 64."""
    root = tmp_path_factory.mktemp('dist')
    common = toy_world(root / 'data', root / 'vocab', sizes=SIZES) + SMALL
    out = {name: root / name for name in 'ABC'}
    t0 = time.perf_counter()
    check(python('train.py', *common, '--num_epochs', '2', '--model_name', str(out['A']), '--logger_name', str(out['A'])))
    t1 = time.perf_counter()
    b = check(torchrun(2, 'train.py', *common, '--num_epochs', '1', '--model_name', str(out['B']),
                       '--logger_name', str(out['B'])))
    t2 = time.perf_counter()
    check(torchrun(2, 'train.py', *common, '--num_epochs', '2', '--resume', str(out['A'] / 'checkpoint_0.pth.tar'),
                   '--model_name', str(out['C']), '--logger_name', str(out['C'])))
    print(f'\none process, 2 epochs: {t1 - t0:.1f} s; two processes, 1 epoch: {t2 - t1:.1f} s')
    return root, out, b


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(runs):
    _, out, _ = runs
    one, two = load_checkpoint(out['A'] / 'checkpoint_0.pth.tar'), load_checkpoint(out['B'] / 'checkpoint_0.pth.tar')
    assert (one['world_size'], two['world_size']) == (1, 2)
    assert one['Eiters'] == two['Eiters'] == 8  # 505 pairs in global batches of 64
    assert max_weight_difference(one['model'], two['model']) < 1e-5
    for a, b in zip(one['optimizers'], two['optimizers']):
        for i in a['state']:
            torch.testing.assert_close(a['state'][i]['exp_avg'], b['state'][i]['exp_avg'], rtol=0, atol=1e-6)
    assert one['best_rsum'] == two['best_rsum']


@pytest.mark.slow
def test_resuming_under_torchrun_continues_the_single_process_run(runs):
    _, out, _ = runs
    one = load_checkpoint(out['A'] / 'checkpoint_1.pth.tar')
    resumed = load_checkpoint(out['C'] / 'checkpoint_1.pth.tar')
    assert resumed['world_size'] == 2 and resumed['Eiters'] == one['Eiters'] == 16
    assert max_weight_difference(one['model'], resumed['model']) < 1e-5


@pytest.mark.slow
def test_only_rank_0_writes_and_logs(runs):
    _, out, b = runs
    files = sorted(os.listdir(out['B']))
    events = [f for f in files if f.startswith('events.out.tfevents')]
    assert len(events) == 1  # one TensorBoard writer
    assert sorted(set(files) - set(events)) == ['.lock', 'checkpoint_0.pth.tar', 'model_best.pth.tar', 'train.log']
    log = (out['B'] / 'train.log').read_text()
    assert log.count('epoch 0 done') == 1 and log.count('validation (') == 1
    assert '2 processes (gloo): each takes 32 pairs of every global batch of 64' in log
    assert b.stderr.count('epoch 0 done') == 1  # the terminal shows rank 0's lines only


@pytest.mark.slow
def test_sharded_evaluation_equals_one_process_exactly(runs, tmp_path):
    root, out, _ = runs
    model = str(out['A'] / 'checkpoint_1.pth.tar')
    # torchrun starts each process with OMP_NUM_THREADS=1, and the caption encoder's GRU rounds a few
    # words 1 ulp differently when started so (MKL's single-threaded kernels): the one process gets the
    # same setting, so that the sharding of the scoring is the only difference.
    one = check(python('evaluation.py', '--model_path', model, '--split', 'test', '--eval_memory_gb', '0.0001',
                       '--save_sims', str(tmp_path / 'one.npy'), env={'OMP_NUM_THREADS': '1'}))
    two = check(torchrun(2, 'evaluation.py', '--model_path', model, '--split', 'test', '--eval_memory_gb', '0.0001',
                         '--save_sims', str(tmp_path / 'two.npy')))
    a, b = np.load(tmp_path / 'one.npy'), np.load(tmp_path / 'two.npy')
    assert a.shape == (20, 100) and np.array_equal(a, b)  # bit for bit: the same chunks, scored once each
    assert one.stdout.count('rsum:') == two.stdout.count('rsum:') == 1  # rank 0 prints
    assert one.stdout.splitlines()[-3:] == two.stdout.splitlines()[-3:]
    assert sorted(os.listdir(tmp_path)) == ['one.npy', 'one_ranks.npz', 'two.npy', 'two_ranks.npz']


# Failures ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('how', ['raise', 'kill'])
def test_a_failing_rank_ends_every_rank(runs, tmp_path, how):
    """Rank 1 raises (or is killed) at its second step while rank 0 waits in the gradient
    all_reduce: the run ends, non-zero, within seconds, with the error named once."""
    root, _, _ = runs
    common = ['--data_path', str(root / 'data'), '--data_name', 'toy_precomp', '--vocab_path', str(root / 'vocab')]
    t0 = time.perf_counter()
    result = torchrun(2, WORKER, how, *common, *SMALL, '--model_name', str(tmp_path / 'run'),
                      '--logger_name', str(tmp_path / 'run'), timeout=120)
    seconds = time.perf_counter() - t0
    assert result.returncode != 0 and seconds < 90
    if how == 'raise':
        assert 'error: rank 1: injected failure on rank 1' in result.stderr
        assert 'traceback : error: rank 1: injected failure on rank 1' in result.stderr  # torchrun's report names it
    assert 'checkpoint_0.pth.tar' not in os.listdir(tmp_path / 'run')


@pytest.mark.slow
def test_indivisible_batch_is_one_line_under_torchrun(runs, tmp_path):
    root, _, _ = runs
    common = ['--data_path', str(root / 'data'), '--data_name', 'toy_precomp', '--vocab_path', str(root / 'vocab')]
    result = torchrun(2, 'train.py', *common, *SMALL, '--batch_size', '63', '--model_name', str(tmp_path / 'run'),
                      '--logger_name', str(tmp_path / 'run'), timeout=120)
    assert result.returncode != 0
    assert 'error: rank 0: --batch_size 63: not divisible by the 2 processes' in result.stderr
    assert 'Traceback' not in result.stderr.split('error: rank')[0]


@pytest.mark.parametrize('value', ['ten', '0', 'nan'])
def test_a_bad_timeout_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv('RANK', '0'), monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('CASC_DIST_TIMEOUT', value)
    with pytest.raises(ValueError, match=rf"CASC_DIST_TIMEOUT='{value}': expected a number of seconds > 0"):
        parallel.start(torch.device('cpu'))
    assert parallel.world() == 1  # no process group was joined


# Sharded scoring: every process gets about 1/N of the pairs ------------------------------------------

@pytest.mark.parametrize('parts', [1, 2, 3, 8])
def test_deal_gives_each_process_a_contiguous_run_of_about_1_over_n_of_the_work(parts):
    sizes = [7, 7, 7, 3, 100, 1, 1, 5, 5, 5, 5, 40]  # pairs of work items
    shares = [parallel.deal(sizes, parts, p) for p in range(parts)]
    assert sum(shares, []) == list(range(len(sizes)))  # every item once, contiguous runs in rank order
    total = sum(sizes)
    ends = np.cumsum([sum(sizes[k] for k in s) for s in shares])  # where each share ends
    for p, end in enumerate(ends):  # a share's end is off the ideal cut by half an item at most
        cut = total * (p + 1) / parts
        assert abs(end - cut) <= max(sizes) / 2, (p, end, cut)


@pytest.mark.slow  # torchrun: a few seconds
def test_three_processes_score_a_third_of_the_pairs_each_whatever_the_budget(tmp_path):
    """Two caption batches of 16 and 13 captions x 23 images: with a large budget one chunk of
    images covers a whole caption batch, which ranks dealt chunks per batch left to rank 0 alone.
    The matrix equals one process's bit for bit."""
    sys.path.insert(0, os.path.dirname(WORKER))
    import dist_worker
    import evaluation
    budgets = ['64', '1e-9']  # one chunk per batch (before MIN_ITEMS); one image per chunk
    check(torchrun(3, WORKER, 'pairs', str(tmp_path / 'pairs.pt'), *budgets))
    got = load_checkpoint(tmp_path / 'pairs.pt')
    model, img, caps = dist_worker.scoring_inputs()
    total = 23 * 29
    for budget, sims, per_rank in zip(budgets, got['sims'], got['pairs']):
        assert sum(per_rank) == total, budget
        assert all(abs(n - total / 3) <= total / 12 for n in per_rank), (budget, per_rank)  # 1/3 +- 1/12
        one = evaluation.compute_sims(model, img, caps, float(budget), progress=False)
        assert torch.equal(sims, one), budget  # bit for bit
