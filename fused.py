"""The CPU's fused cross attention (fused.cpp): every step after the region-word product in one pass
over each pair's (R x L) block, in cache, instead of ~30 passes of full-size tensors through memory.

Built on first use with the system's C++ compiler (a few seconds of CPU) into ~/.cache/casc, once per
source, compiler and CPU, and loaded with ctypes (no torch headers, no build step at install).
Without a compiler, or with CASC_FUSED=0, engine.cross_attention runs its eager code, which computes
the same numbers (tested: tests/test_model.py) and is what CUDA, float64 and training use.
"""
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import torch
from torch import Tensor

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fused.cpp')
FLAGS = ('-O3', '-march=native', '-fno-math-errno', '-std=gnu++17', '-shared', '-fPIC', '-pthread')
OPENMP = '-fopenmp'  # tried first: torch's own threads (libgomp), else std::thread (fused.cpp, parallel)
NORMS = {'clipped_l2norm': (1, 1), 'l2norm': (1, 0), 'clipped_l1norm': (2, 1), 'l1norm': (2, 0),
         'clipped': (0, 1), 'no_norm': (0, 0)}  # raw_feature_norm -> (kind, clipped); not 'softmax'
AGGS = {'Mean': 0, 'Max': 1, 'Sum': 2, 'LogSumExp': 3}
_state = {'tried': False, 'lib': None}
_lock = threading.Lock()


def _build_key(cxx: str, flags: tuple) -> str:
    """Source, flags, compiler and CPU (-march=native code must not run on another CPU of a shared cache)."""
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=30).stdout
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((ln for ln in f if ln.startswith(('flags', 'Features'))), '')
    except OSError:
        cpu = ''
    with open(SOURCE, 'rb') as f:
        parts = [f.read(), ' '.join(flags).encode(), version.encode(), cpu.encode()]
    return hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]


def _compile(cxx: str, flags: tuple) -> str:
    """The shared library built with these flags (cached by _build_key) -> its path; OSError if it fails."""
    cache = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'casc')
    path = os.path.join(cache, f'fused_{_build_key(cxx, flags)}.so')
    if not os.path.exists(path):  # a temporary then a rename: concurrent processes never load half a file
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
        os.close(fd)
        try:
            res = subprocess.run([cxx, *flags, SOURCE, '-o', tmp], capture_output=True, text=True, timeout=300)
            if res.returncode:
                raise OSError(f'{cxx} failed: {res.stderr.strip()[-500:]}')
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _build() -> ctypes.CDLL:
    cxx = os.environ.get('CXX', 'g++')
    if not shutil.which(cxx):
        raise OSError(f'no C++ compiler {cxx!r}')
    try:
        lib = ctypes.CDLL(_compile(cxx, FLAGS + (OPENMP,)))
    except OSError:  # no OpenMP here (clang without libomp): the kernel's own threads
        lib = ctypes.CDLL(_compile(cxx, FLAGS))
    f, i, p = ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    i64 = ctypes.c_int64
    lib.casc_cross_attention.argtypes = [p, i64, i, i, i, i, p, p, p, p, p, i, i, f, f, i, i, f, p, p, p, i,
                                         p, p, p, p, i]
    lib.casc_bias_tanh.argtypes = [p, p, i64, i, p, i]
    lib.casc_label_cosine.argtypes = [p, i64, i64, p, i64, i64, i, i, i, p, i]
    return lib


def library():
    """The loaded kernel, or None (CASC_FUSED=0, no compiler, a failed build: logged once)."""
    with _lock:
        if not _state['tried']:
            _state['tried'] = True
            if os.environ.get('CASC_FUSED', '1') != '0':
                try:
                    _state['lib'] = _build()
                except (OSError, subprocess.SubprocessError) as e:
                    logging.getLogger(__name__).warning('fused CPU kernel unavailable, eager scoring: %s', e)
        return _state['lib']


def plain(*tensors: Tensor) -> bool:
    """Whether the kernels can take these: float32 on the CPU, no gradient wanted, the kernel loaded."""
    return (all(t.device.type == 'cpu' and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and library() is not None)


def applies(img, cap, raw_feature_norm: str) -> bool:
    """Whether cross_attention can score these prepared Sides: plain tensors, all regions real, each
    caption's real words first (as encode_captions pads), a supported raw_feature_norm."""
    return (raw_feature_norm in NORMS and img.mask is None and bool((cap.mask[:, 1:] <= cap.mask[:, :-1]).all())
            and plain(img.emb, cap.emb, img.gram, cap.gram, *(t for t in (img.proj, cap.proj) if t is not None)))


def _ptr(t):
    return None if t is None else t.data_ptr()


def cross_attention(s_rw: Tensor, img, cap, *, raw_feature_norm: str, lambda_t2i: float, lambda_i2t: float,
                    t2i_agg: str, i2t_agg: str, lambda_lse: float, b1: Tensor = None) -> tuple:
    """s_rw (n_img * R, n_cap * L) float32 region-word products (rows of any stride, engine.padded_rows)
    of the prepared Sides img, cap -> s_t2i, s_i2t (n_img, n_cap); when both Sides carry the label
    head's projections (Side.proj), h_img, h_txt (n_img, n_cap, H): the head's first layer W1 u of
    each pair's pooled contexts (u_img the mean over real words of the t2i attended regions, u_txt the
    mean over regions of the i2t attended words), or given b1 (H,) the hidden layers tanh(W1 u + b1);
    else None, None."""
    n_img, R, _ = img.emb.shape
    n_cap, L = cap.mask.shape
    if s_rw.stride(1) != 1 or s_rw.stride(0) < n_cap * L:
        s_rw = s_rw.contiguous()  # rows may be padded (engine.GEMM_LANES): the kernel takes their stride
    lens = cap.mask.sum(1, dtype=torch.int32)
    img_norm, img_gram, cap_norm, cap_gram = (t.contiguous() for t in (img.norm, img.gram, cap.norm, cap.gram))
    s_t2i, s_i2t = torch.empty(n_img, n_cap), torch.empty(n_img, n_cap)
    head = img.proj is not None and cap.proj is not None
    img_proj, cap_proj = (t.contiguous() if head else None for t in (img.proj, cap.proj))
    H = img_proj.size(-1) if head else 0
    h_img, h_txt = (torch.empty(n_img, n_cap, H) if head else None for _ in range(2))
    b1 = b1.contiguous() if head and b1 is not None else None
    kind, clipped = NORMS[raw_feature_norm]
    library().casc_cross_attention(
        _ptr(s_rw), s_rw.stride(0), n_img, R, n_cap, L, _ptr(lens), _ptr(img_norm), _ptr(img_gram), _ptr(cap_norm),
        _ptr(cap_gram), kind, clipped, lambda_t2i, lambda_i2t, AGGS[t2i_agg], AGGS[i2t_agg], lambda_lse,
        _ptr(img_proj), _ptr(cap_proj), _ptr(b1), H, _ptr(s_t2i), _ptr(s_i2t), _ptr(h_img), _ptr(h_txt),
        torch.get_num_threads())
    return s_t2i, s_i2t, h_img, h_txt


def bias_tanh(h: Tensor, bias: Tensor) -> Tensor:
    """tanh(h + bias): h (..., H) contiguous plain tensors, H a multiple of 8 -> a new (..., H)."""
    out = torch.empty_like(h)
    library().casc_bias_tanh(_ptr(h), _ptr(bias.contiguous()), h.numel() // h.size(-1), h.size(-1), _ptr(out),
                             torch.get_num_threads())
    return out


def label_cosine(x: Tensor, y: Tensor) -> Tensor:
    """cos(sigmoid(x), sigmoid(y)) over the last axis: x, y (n0, n1, K) plain, K contiguous, any strides
    of the two pair axes (a transposed view costs no copy) -> (n0, n1)."""
    n0, n1, K = x.shape
    out = torch.empty(n0, n1)
    library().casc_label_cosine(_ptr(x), x.stride(0), x.stride(1), _ptr(y), y.stride(0), y.stride(1), n0, n1, K,
                                _ptr(out), torch.get_num_threads())
    return out
