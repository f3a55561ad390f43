"""Train CASC (SCAN's flags, plus the label head's).

    python train.py --data_path DATA --data_name f30k_precomp --vocab_path vocab \\
        --logger_name runs/f30k/log --model_name runs/f30k
    torchrun --standalone --nproc_per_node N train.py <the same flags>   (N GPUs or CPU processes)

With torchrun, --batch_size stays the global batch and the loss is the single-process loss of it
(parallel.py says how); only rank 0 writes checkpoints, logs and progress.

A run holds --model_name and --logger_name while it runs, and never replaces an earlier run's
checkpoints or logs there unless --resume (continue it) or --overwrite (replace it) says so.
"""
import argparse
import contextlib
import logging
import math
import os
import random
import time

import util  # first: it makes a Ctrl-C during the slow imports below one line
util.quiet_ctrl_c(__name__)

import numpy as np
import torch

import checkpoint
import data
import evaluation
import labels as labels_lib
import parallel
import runs
from engine import PRECISION_HELP, PRECISIONS
from model import CASC, Config
from vocab import deserialize_vocab, vocab_file

log = logging.getLogger('casc')


def parse_args(argv=None):
    p = util.parser(__doc__)
    flag = p.add_argument
    pos_int, pos_float = util.positive_int, util.positive_float
    flag('--data_path', default='./data/', help='folder holding {data_name}/')
    flag('--data_name', default='f30k_precomp', help='f30k_precomp | coco_precomp | toy_precomp')
    flag('--vocab_path', default='./vocab/', help='folder of {data_name}_vocab.json and _labels.json')
    flag('--margin', type=util.finite_float, default=0.2, help='hinge margin')
    flag('--num_epochs', type=util.nonneg_int, default=30, help='epochs in all (a resumed run counts the earlier ones)')
    flag('--batch_size', type=pos_int, default=128, help='pairs per training step')
    flag('--word_dim', type=pos_int, default=300, help='word embedding size')
    flag('--embed_size', type=pos_int, default=1024, help='joint embedding size d')
    flag('--grad_clip', type=pos_float, default=2.0, help='gradient norm clip, per optimizer')
    flag('--num_layers', type=pos_int, default=1, help='GRU layers')
    flag('--learning_rate', type=pos_float, default=2e-4, help='encoders learning rate')
    flag('--lr_update', type=pos_int, default=15, help='encoders lr x0.1 every N epochs')
    flag('--workers', type=util.nonneg_int, default=2, help='data loader processes')
    flag('--log_step', type=pos_int, default=10, help='log every N iterations')
    flag('--val_step', type=pos_int, default=500, help='also validate every N iterations')
    flag('--logger_name', default='./runs/runX/log', help='TensorBoard and train.log folder')
    flag('--model_name', default='./runs/runX/checkpoint', help='checkpoint folder')
    flag('--resume', metavar='PATH', help='checkpoint to continue from (default: start afresh)')
    flag('--overwrite', action='store_true', help='replace the checkpoints and logs of an earlier run in '
                                                  '--model_name and --logger_name')
    flag('--max_violation', action=argparse.BooleanOptionalAction, default=True, help='hardest negatives')
    flag('--img_dim', type=pos_int, default=2048, help='region feature size of {split}_ims.npy')
    flag('--no_imgnorm', action='store_true', help='do not l2-normalize region embeddings')
    flag('--no_txtnorm', action='store_true', help='do not l2-normalize word embeddings')
    flag('--raw_feature_norm', default='clipped_l2norm',
         help='clipped_l2norm|l2norm|clipped_l1norm|l1norm|clipped|softmax|no_norm')
    flag('--t2i_agg_func', default='Mean', help='Mean|Max|Sum|LogSumExp')
    flag('--i2t_agg_func', default='LogSumExp', help='Mean|Max|Sum|LogSumExp')
    flag('--cross_attn', default='all', help='t2i|i2t|all (CASC: the average of both)')
    flag('--precomp_enc_type', default='basic', help='basic|weight_norm')
    flag('--bi_gru', action=argparse.BooleanOptionalAction, default=True, help='bidirectional GRU')
    flag('--lambda_lse', type=pos_float, default=5.0, help='LogSumExp temperature')
    flag('--lambda_softmax_avg', type=pos_float, default=9.0, help='t2i attention softmax temperature')
    flag('--lambda_softmax_lse', type=pos_float, default=4.0, help='i2t attention softmax temperature')
    flag('--num_labels', type=util.nonneg_int, default=500, help='semantic labels K (0: no label head)')
    flag('--label_hidden', type=pos_int, default=512, help='label head hidden size')
    flag('--label_weight', type=util.nonneg_float, default=10.0, help='weight of the label BCE loss')
    flag('--label_lr', type=pos_float, default=0.01, help='label head learning rate')
    flag('--label_lr_decay', type=pos_float, default=0.8, help='label head lr factor')
    flag('--label_lr_update', type=pos_int, default=3, help='label lr x label_lr_decay every N epochs')
    flag('--alpha', type=util.nonneg_float, default=0.8, help='weight of the local score in validation')
    flag('--seed', type=util.seed, default=0, help='seeds the weights and the shuffle')
    flag('--device', help='cuda | cuda:N | cpu | mps (default: cuda when present, else mps, else cpu)')
    flag('--precision', default='fp32', choices=PRECISIONS, help=PRECISION_HELP)
    flag('--eval_memory_gb', type=pos_float, default=2.0, help='memory budget of validation chunks, in GB')
    args = p.parse_args(argv)
    if args.num_labels and not args.label_weight:  # the head would get no gradient, yet score at 1 - alpha
        p.error(f'--label_weight 0 trains no label head, but --num_labels {args.num_labels} adds one whose '
                f'untrained output would be blended into every score: pass --num_labels 0 for CASC-base')
    return args


def load_vocab_and_labels(args):
    """-> (vocab, label words, pos_weight) for args.data_name, or ValueError/OSError naming the file.
    A labels file with fewer than --num_labels labels (labels.py on a small caption set) gives them
    all, said so, and args.num_labels becomes their number (the head's K, stored in checkpoints)."""
    vocab = deserialize_vocab(vocab_file(args.vocab_path, args.data_name))
    if not args.num_labels:
        return vocab, [], None
    path = os.path.join(args.vocab_path, f'{args.data_name}_labels.json')
    lab = labels_lib.load_labels(path)
    if args.num_labels > len(lab['labels']):
        if parallel.is_main():
            print(f'{path} holds {len(lab["labels"])} labels, fewer than --num_labels {args.num_labels}: '
                  f'using all {len(lab["labels"])}', flush=True)
        args.num_labels = len(lab['labels'])
    return vocab, lab['labels'][:args.num_labels], torch.tensor(lab['pos_weight'][:args.num_labels])


def make_optimizers(model, args):
    enc = [p for n, p in model.named_parameters() if not n.startswith('head.')]
    opts = [torch.optim.Adam(enc, lr=args.learning_rate)]
    if model.head is not None:
        opts.append(torch.optim.Adam(model.head.parameters(), lr=args.label_lr))
    return opts


def set_lr(opts, epoch, args):
    """Learning rates as a pure function of the epoch (so resuming needs no scheduler state)."""
    lrs = [args.learning_rate * 0.1 ** (epoch // args.lr_update),
           args.label_lr * args.label_lr_decay ** (epoch // args.label_lr_update)]
    for opt, lr in zip(opts, lrs):
        for group in opt.param_groups:
            group['lr'] = lr
    return lrs[:len(opts)]


def validate(model, val_set, args, device, writer, step):
    """-> rsum on the validation set (every process scores its share; rank 0 logs)."""
    sims, seconds = evaluation.evaluate_arrays(model, val_set.images, val_set.captions, device,
                                               args.eval_memory_gb, args.alpha, args.precision, log=log.info)
    metrics = parallel.broadcast(evaluation.recall_metrics(sims, val_set.im_div) if parallel.is_main() else None)
    log.info('validation (%.1f s): %s', seconds, ' '.join(f'{k} {v:.1f}' for k, v in metrics.items()))
    for k, v in metrics.items():
        writer.add_scalar(f'val/{k}', v, step)
    return metrics['rsum']


def label_stats(logits, targets):
    """Precision and recall (percent) of the labels predicted with p > 0.5."""
    pred, gold = logits > 0, targets > 0.5
    tp = (pred & gold).sum().item()
    return 100.0 * tp / max(pred.sum().item(), 1), 100.0 * tp / max(gold.sum().item(), 1)


def train_one_epoch(model, opts, loader, pos_weight, args, state, writer, on_val_step):
    """One pass over the training set; state holds 'epoch' and 'Eiters' (updated in place)."""
    model.train()
    device = pos_weight.device if pos_weight is not None else next(model.parameters()).device
    groups = [[p for g in opt.param_groups for p in g['params']] for opt in opts]
    bar = util.progress(loader, desc=f'epoch {state["epoch"]}', unit='batch', log=log.info)  # rank 0's alone
    for images, captions, lengths, targets, _, _ in bar:
        t0 = time.perf_counter()
        images, captions = images.to(device, non_blocking=True), captions.to(device, non_blocking=True)
        targets = None if targets is None else targets.to(device, non_blocking=True)
        gather = parallel.Gather(len(images), device) if parallel.world() > 1 else None
        out = model(images, captions, lengths, targets, pos_weight, gather)
        if not math.isfinite(out.loss.item()):
            raise FloatingPointError(f'non-finite loss at iteration {state["Eiters"] + 1} (epoch '
                                     f'{state["epoch"]}); stopped, the last good checkpoint in '
                                     f'{args.model_name} is kept')
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        out.loss.backward()
        parallel.average_gradients([p for params in groups for p in params])
        for opt, params in zip(opts, groups):
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
        state['Eiters'] += 1
        stats = {k: getattr(out, k).item() for k in ('loss', 'hinge', 'label_loss') if getattr(out, k) is not None}
        stats['pairs_per_s'] = (gather.total if gather else len(images)) / (time.perf_counter() - t0)
        if out.logits_img is not None:
            stats['label_precision'], stats['label_recall'] = label_stats(out.logits_img, out.targets)
        bar.set_postfix(loss=f'{stats["loss"]:.3f}', pairs_s=f'{stats["pairs_per_s"]:.0f}')
        if state['Eiters'] % args.log_step == 0:
            log.info('epoch %d iter %d %s', state['epoch'], state['Eiters'],
                     ' '.join(f'{k} {v:.4g}' for k, v in stats.items()))
            for k, v in stats.items():
                writer.add_scalar(f'train/{k}', v, state['Eiters'])
        if state['Eiters'] % args.val_step == 0:
            on_val_step()


def setup_logging(folder):
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter('%(asctime)s %(message)s')
    for handler in (logging.FileHandler(os.path.join(folder, 'train.log'), encoding='utf-8'),
                    logging.StreamHandler()):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def close_logging(message=None):
    """Write a last message to train.log only (the caller prints it once to the terminal)."""
    for handler in list(log.handlers):
        if message and isinstance(handler, logging.FileHandler):
            handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None))
        handler.close()
        log.removeHandler(handler)


def run(args, saved: list):
    """Check everything that can be checked cheaply, hold the output folders, then train.
    `saved` receives the path of every checkpoint this run writes, before writing it (for the
    Ctrl-C message: writes are atomic, so the ones that exist are complete)."""
    from torch.utils.tensorboard import SummaryWriter
    device = parallel.start(util.pick_device(args.device))  # under torchrun: this process's device
    util.set_precision(args.precision)
    main = parallel.is_main()
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    vocab, label_words, pos_weight = load_vocab_and_labels(args)
    cfg = Config.from_opt(vars(args), vocab_size=len(vocab))
    ckpt = checkpoint.read(args.resume, '--resume') if args.resume else None  # before any data is loaded
    if ckpt is not None:
        checkpoint.check_resume(ckpt, args.resume, cfg, vocab, vocab_file(args.vocab_path, args.data_name),
                                label_words)
    data.check_img_dim(args.data_path, args.data_name, ('train', 'dev'), args.img_dim)
    with contextlib.ExitStack() as held:
        stale = runs.hold(held, args, ckpt['epoch'] if ckpt else 0) if main else []  # rank 0 writes there
        train_loader, val_set = data.get_loaders(args.data_path, args.data_name, vocab, args.batch_size,
                                                    args.workers, label_words or None, device.type == 'cuda',
                                                    args.seed)
        if not main:
            return fit(args, cfg, vocab, label_words, pos_weight, ckpt, device, train_loader, val_set,
                       _NoWriter(), saved)
        leftovers = runs.clear(args, stale)  # only now: a run that fails to start leaves the earlier one as it was
        setup_logging(args.logger_name)
        if stale:
            log.info('--overwrite: removed %s', ', '.join(stale))
        if leftovers:
            log.info('removed the half-written temporary files of a killed run: %s', ', '.join(leftovers))
        # Resumed: drop the curves' points the killed run logged after its checkpoint (they are redone).
        writer = SummaryWriter(args.logger_name, purge_step=ckpt['Eiters'] + 1 if ckpt else None)
        from tqdm.contrib.logging import logging_redirect_tqdm  # log lines do not break the bar
        with logging_redirect_tqdm([log]):
            return fit(args, cfg, vocab, label_words, pos_weight, ckpt, device, train_loader, val_set,
                       writer, saved)


class _NoWriter:
    """The TensorBoard writer of the processes other than rank 0: they write nothing."""

    def add_scalar(self, *args, **kwargs):
        pass

    def close(self):
        pass


def fit(args, cfg, vocab, label_words, pos_weight, ckpt, device, train_loader, val_set, writer, saved):
    """Train from the start or from `ckpt` to --num_epochs, validating and saving every epoch."""
    model = CASC(cfg).to(device)
    opts = make_optimizers(model, args)
    state = {'epoch': 0, 'Eiters': 0, 'best_rsum': -math.inf}
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        for opt, opt_state in zip(opts, ckpt['optimizers']):
            opt.load_state_dict(opt_state)
        state.update(epoch=ckpt['epoch'], Eiters=ckpt['Eiters'], best_rsum=ckpt['best_rsum'])
        log.info('resumed from %s at epoch %d, iteration %d', args.resume, state['epoch'], state['Eiters'])
    parallel.same_weights(model)
    pos_weight = None if pos_weight is None else pos_weight.to(device)
    log.info('%s on %s: %d training pairs, %d parameters', cfg, device, len(train_loader.dataset),
             sum(p.numel() for p in model.parameters()))
    if parallel.world() > 1:
        log.info('%d processes (%s): each takes %d pairs of every global batch of %d', parallel.world(),
                 torch.distributed.get_backend(), args.batch_size // parallel.world(), args.batch_size)
    best_path = os.path.join(args.model_name, 'model_best.pth.tar')

    def checkpoint_state(epoch_done):
        return {'model': model.state_dict(), 'optimizers': [o.state_dict() for o in opts],
                'epoch': state['epoch'] + epoch_done, 'Eiters': state['Eiters'], 'best_rsum': state['best_rsum'],
                'opt': vars(args), 'vocab': vocab.words(), 'vocab_size': len(vocab), 'labels': list(label_words),
                'world_size': parallel.world()}

    def validate_and_keep_best(epoch_done=0):
        rsum = validate(model, val_set, args, device, writer, state['Eiters'])
        is_best = rsum > state['best_rsum']
        state['best_rsum'] = max(rsum, state['best_rsum'])
        if is_best and not epoch_done and parallel.is_main():
            saved.append(best_path)
            checkpoint.save(checkpoint_state(0), best_path)
        return is_best

    for epoch in range(state['epoch'], args.num_epochs):
        state['epoch'] = epoch
        for k, lr in zip(('lr/encoders', 'lr/label_head'), set_lr(opts, epoch, args)):
            writer.add_scalar(k, lr, state['Eiters'])
        torch.manual_seed(args.seed + epoch)  # seeds the loader workers; the same in a resumed run
        train_loader.batch_sampler.set_epoch(epoch)  # the shuffle: a function of --seed and the epoch
        train_one_epoch(model, opts, train_loader, pos_weight, args, state, writer, validate_and_keep_best)
        is_best = validate_and_keep_best(epoch_done=1)
        if parallel.is_main():
            path = os.path.join(args.model_name, f'checkpoint_{epoch}.pth.tar')
            saved.append(path)  # before writing: a Ctrl-C just after the write still names it
            checkpoint.save(checkpoint_state(1), path, best_path if is_best else None)
            log.info('epoch %d done: %s%s', epoch, path, ' (best)' if is_best else '')
    writer.close()
    return state


def main(argv=None):
    args = parse_args(argv)
    saved = []  # checkpoints this run writes (or began to write: the complete ones exist)

    def interrupted():
        if not parallel.is_main():
            return f'interrupted (rank {parallel.rank()})'
        done = [p for p in saved if os.path.exists(p)]
        last = next((p for p in reversed(done) if os.path.basename(p).startswith('checkpoint_')), None)
        msg = (f'interrupted: the last checkpoint is {last}; continue with --resume {last}' if last else
               f'interrupted before the first epoch ended: no checkpoint was written'
               f'{" (model_best.pth.tar holds the best model so far)" if done else ""}')
        close_logging(msg)
        return msg

    with util.one_line_errors(on_interrupt=interrupted):
        try:
            state = run(args, saved)
            parallel.stop(finished=True)
        except (OSError, ValueError, FloatingPointError) as e:
            close_logging(f'error: {e}')
            raise ValueError(parallel.error_line(e)) from None
        finally:
            parallel.stop()
        close_logging()
        return state


if __name__ == '__main__':
    main()
