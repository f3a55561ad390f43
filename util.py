"""What every command-line script shares: the rank and the progress bar (progress.py: the lines
off a terminal), safe writes, the folder lock, flag types and help, one-line errors, the device,
printable data text. Nothing here knows about CASC itself."""
import argparse
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time

from progress import LogProgress

# ---------------------------------------------------------------------------------------------
# Progress: a tqdm bar in a terminal; elsewhere (a log file, CI, nohup) progress.py's LogProgress.


def rank() -> int:
    """This process's rank: torch.distributed's once it is initialized, else the RANK torchrun
    set, else 0. Reads torch only when something else imported it (scripts without torch stay fast)."""
    dist = sys.modules.get('torch.distributed')
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = os.environ.get('RANK', '0')
    return int(env) if env.isdigit() else -1  # not a rank torchrun sets: not rank 0


def progress(iterable=None, *, total=None, desc='', unit='it', unit_scale=False, log=None,
             enabled: bool = True, leave: bool = True):
    """A progress bar (tqdm) when stderr is a terminal (leave=False: erased when done), else a
    LogProgress that writes through `log` (default: stderr). enabled=False, or a process other
    than rank 0 under torchrun: neither (the object still counts)."""
    enabled = enabled and rank() == 0
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                    dynamic_ncols=True, mininterval=0.5, leave=leave)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, log=log,
                       interval=None if enabled else math.inf)


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, writable outputs, the folder lock.


def atomic_write(path: str, write):
    """write(binary file) into a temporary file beside `path`, flushed to disk, then renamed onto
    it: a crash or a full disk leaves any previous file intact and no partial file behind. A full
    disk (or quota) is one OSError line naming the file, however deep in `write` (torch.save) it arose."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = no_space(e)
        if full:
            kept = '; the previous file is left as it was' if os.path.exists(path) else ''
            raise OSError(f'{path}: not written, {full} ({free_space(path)} free there){kept}') from None
        raise


def no_space(e: BaseException) -> str:
    """'no space left on the device' or 'over the disk quota' when e, or an error it was raised
    while handling (torch.save turns the OSError of its file object into a RuntimeError), is
    ENOSPC or EDQUOT; else ''."""
    for _ in range(10):  # the chain of __cause__ / __context__
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return 'no space left on the device' if e.errno == errno.ENOSPC else 'over the disk quota'
        e = e.__cause__ or e.__context__
        if e is None:
            break
    return ''


def free_space(path: str) -> str:
    """Free space on the file system of `path`'s folder, e.g. '12.5 MB', or '?' when unknown."""
    try:
        return f'{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 1e6:.1f} MB'
    except OSError:
        return '?'


def already_written(path: str, same, other: str, flag: str = '--vocab_path') -> bool:
    """Before replacing an existing output file: True when it already holds the same contents
    (same(path), which may raise ValueError for an unreadable file: that counts as other), else
    ValueError naming it, --overwrite and the flag that picks another place; False when there is
    no such file."""
    if not os.path.exists(path):
        return False
    try:
        if same(path):
            return True
    except ValueError:
        pass
    raise ValueError(f'{path} exists and holds {other}: pass --overwrite to replace it, or choose another {flag}')


def unchanged(path: str, content: bytes, overwrite: bool, other: str, flag: str) -> bool:
    """Before writing `content` to path: True when path already holds exactly it (left as it is, with
    or without overwrite); ValueError (already_written's) when it holds other contents, unless
    overwrite; False when it is to be written."""
    def same(p):
        with open(p, 'rb') as f:
            return f.read() == content
    if overwrite:
        return os.path.exists(path) and same(path)
    return already_written(path, same, other, flag)


def read_text_lines(path: str) -> list:
    """A UTF-8 text file -> [(line number, line stripped of surrounding whitespace)]; a BOM
    (Windows editors) is dropped; ValueError naming the file and line of a line that is not UTF-8."""
    lines = []
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                lines.append((n, raw.decode('utf-8-sig' if n == 1 else 'utf-8').strip()))
            except UnicodeDecodeError as e:
                raise ValueError(f'{path}: line {n} is not UTF-8 text (byte {e.start}: '
                                 f'{raw[e.start:e.start + 1]!r})') from None
    return lines


def check_writable(path: str, flag: str, folder: bool = False):
    """Fail now, with one line naming the flag, if an output file (or folder) cannot be written:
    before the work that produces it, not after. Creates missing parent folders."""
    target = path if folder else os.path.dirname(os.path.abspath(path))
    if not folder and os.path.isdir(path):
        raise ValueError(f'{flag} {path}: is a folder, expected a file name')
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        raise ValueError(f'{flag} {path}: cannot write there ({e.strerror or e})') from None


class FolderLock:
    """Hold `folder` for this process alone while it runs: an OS lock (flock) on folder/.lock,
    which the OS releases when the process ends however it ends, so a lock is never stale. A
    second holder, in this or another process, is refused with one line naming the first."""

    def __init__(self, folder: str, flag: str):
        self.folder, self.flag, self.fd = folder, flag, None

    def __enter__(self):
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(os.path.join(self.folder, '.lock'), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f'{self.flag} {self.folder}: cannot use it as a folder ({e.strerror or e})') from None
        try:
            _lock(fd)
        except OSError:
            holder = os.read(fd, 1000).decode('utf-8', 'replace').strip() or 'another process'
            os.close(fd)
            raise ValueError(f'{self.flag} {self.folder} is in use by {holder}: wait for that run to end '
                             f'or choose another {self.flag}') from None
        os.ftruncate(fd, 0)
        os.write(fd, (f'pid {os.getpid()} on {socket.gethostname()} since '
                      f'{time.strftime("%Y-%m-%d %H:%M:%S")} ({sys.argv[0] if sys.argv else "python"})').encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _lock(fd: int):
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


# ---------------------------------------------------------------------------------------------
# Flags: checked types, help that shows each default once, one-line errors, the device.


def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}') from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
        return value

    return parse


positive_float = _number(float, lambda v: v > 0, 'a positive number')
nonneg_float = _number(float, lambda v: v >= 0, 'a number >= 0')
finite_float = _number(float, lambda v: True, 'a finite number')
positive_int = _number(int, lambda v: v > 0, 'a positive integer')
nonneg_int = _number(int, lambda v: v >= 0, 'an integer >= 0')
seed = _number(int, lambda v: 0 <= v < 2 ** 32, 'an integer from 0 to 4294967295')  # numpy's seed range


class Help(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, said once: '(default: X)', '(required)', or the
    '(default: ...)' the help text already spells out (for defaults computed at run time)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if action.required:
            return f'{text} (required)'.strip()
        if '(default' in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f'{text} (default: {"on" if action.default else "off"})'.strip()
        if action.nargs == 0:  # store_true
            return f'{text} (default: off)'.strip()
        return f'{text} (default: %(default)s)'.strip()


def parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows the module docstring (usage examples) and defaults."""
    return argparse.ArgumentParser(description=doc, formatter_class=Help)


def _interrupted_at_start(signum, frame):
    print('interrupted', file=sys.stderr, flush=True)
    os._exit(130)  # nothing is written yet; a SystemExit raised inside an import could be swallowed


def quiet_ctrl_c(name: str):
    """A script's first statement, with its __name__, before its slow imports (torch: seconds): run as
    a program, Ctrl-C before main() is under one_line_errors says 'interrupted' and exits 130, not an
    import's traceback. Imported (tests, multiprocessing's spawned workers), it does nothing."""
    if name == '__main__':
        signal.signal(signal.SIGINT, _interrupted_at_start)


@contextlib.contextmanager
def one_line_errors(on_interrupt=None):
    """Turn a bad file or flag (OSError, ValueError) into 'error: ...' (control characters escaped,
    util.printable) and exit 1, and Ctrl-C into
    on_interrupt()'s line (default 'interrupted') and exit 130, the shell's code for SIGINT."""
    if signal.getsignal(signal.SIGINT) is _interrupted_at_start:  # from here on, Ctrl-C is KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        print(on_interrupt() if on_interrupt else 'interrupted', file=sys.stderr, flush=True)
        sys.exit(130)
    except (OSError, ValueError) as e:  # messages quote file lines and names: escaped, and one line
        sys.exit(f'error: {printable(e)}')


def pick_device(name=None):
    """--device, checked (one line when this machine lacks it); by default CUDA when present,
    else Apple MPS, else the CPU."""
    import torch
    if not name:
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name}: expected cpu, cuda, cuda:N or mps') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: no CUDA device here (torch {torch.__version__}); use --device cpu')
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f'--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f'--device {name}: Apple MPS is not available here; use --device cpu')
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f'--device {name}: expected cpu, cuda, cuda:N or mps')
    return device


def set_precision(precision: str):
    """--precision, set once where a program starts: 'tf32' lets CUDA's float32 products (matmuls,
    and cuDNN's: the GRU, convolutions) use the TF32 tensor cores (engine.region_word_product
    emulates its rounding on other devices); 'fp32' and 'bf16' keep them exact (cuDNN's TF32 is on
    by default in PyTorch: fp32 turns it off)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
    torch.backends.cudnn.allow_tf32 = precision == 'tf32'


@contextlib.contextmanager
def precision_scope(precision: str):
    """set_precision for the block only, the flags as they were after it: for a Python API (search.Searcher)
    that must not change the caller's process."""
    import torch
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# Data text on a terminal or in a log.

# C0 and C1 controls (ESC, BEL, newlines, DEL, CSI), and the characters that reorder a line (bidi).
_CONTROLS = re.compile('[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]')


def printable(text) -> str:
    """Data text (a caption, query, image or label name) for a terminal or a log line: control
    characters shown as Python escapes ('\\x1b', '\\n', '\\u202e'), so that none acts on the
    terminal or splits a line; everything else unchanged."""
    return _CONTROLS.sub(lambda m: m.group().encode('unicode_escape').decode('ascii'), str(text))
