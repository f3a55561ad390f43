"""A training run's folders, --model_name and --logger_name: held by one run at a time
(util.FolderLock), an earlier run's checkpoints and logs never replaced unless --resume or
--overwrite says so, and the half-written files of a killed run removed."""
import contextlib
import glob
import os

import util


def earlier_run(args) -> tuple:
    """(checkpoint files, log files) that an earlier run left in --model_name / --logger_name."""
    ckpts = sorted(glob.glob(os.path.join(glob.escape(args.model_name), 'checkpoint_*.pth.tar')), key=_epoch_of)
    ckpts += glob.glob(os.path.join(glob.escape(args.model_name), 'model_best.pth.tar'))
    logs = glob.glob(os.path.join(glob.escape(args.logger_name), 'train.log'))
    logs += glob.glob(os.path.join(glob.escape(args.logger_name), 'events.out.tfevents.*'))
    return ckpts, logs


def _epoch_of(path: str) -> int:
    stem = os.path.basename(path)[len('checkpoint_'):-len('.pth.tar')]
    return int(stem) if stem.isdigit() else -1


def check_earlier_run(args, start_epoch: int) -> list:
    """Never replace an earlier run's checkpoints or logs behind the user's back: a fresh run into
    folders that hold them is refused, and so is a resumed run that would replace checkpoints of
    later epochs, unless --overwrite. -> the files --overwrite will remove."""
    ckpts, logs = earlier_run(args)
    names = lambda paths: ', '.join(os.path.basename(p) for p in paths[:4]) + (', ...' if len(paths) > 4 else '')  # noqa
    if args.resume:
        later = [p for p in ckpts if _epoch_of(p) >= start_epoch]
        if later and not args.overwrite:
            raise ValueError(f'--model_name {args.model_name} holds checkpoints of epochs the resumed run would '
                             f'write again ({names(later)}): pass --overwrite to replace them, or resume into '
                             f'another --model_name')
        return later
    if (ckpts or logs) and not args.overwrite:
        last = [p for p in ckpts if _epoch_of(p) >= 0][-1:]
        hint = f'--resume {last[0]} to continue it, ' if last else ''
        raise ValueError(f'an earlier run left {names(ckpts + logs)} in {args.model_name}'
                         f'{"" if args.logger_name == args.model_name else " / " + args.logger_name}: pass '
                         f'{hint}--overwrite to replace it, or choose another --model_name and --logger_name')
    return ckpts + logs


def hold(held: contextlib.ExitStack, args, start_epoch: int) -> list:
    """Lock --model_name and --logger_name (one lock when they are the same folder) for the
    life of `held`, then check_earlier_run: -> the files --overwrite will remove."""
    for folder, flag in ((args.model_name, '--model_name'), (args.logger_name, '--logger_name')):
        if flag == '--model_name' or os.path.realpath(folder) != os.path.realpath(args.model_name):
            held.enter_context(util.FolderLock(folder, flag))
    return check_earlier_run(args, start_epoch)


def clear(args, stale: list) -> list:
    """Remove the files --overwrite replaces (stale) and a killed run's half-written checkpoints
    -> the latter. A run killed while writing a checkpoint (SIGKILL, power loss) leaves its
    temporary file; the folder is held, so no live run is writing these."""
    for path in stale:
        os.remove(path)
    leftovers = glob.glob(os.path.join(glob.escape(args.model_name), '*.pth.tar.tmp*'))
    for path in leftovers:
        os.remove(path)
    return leftovers
