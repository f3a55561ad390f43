"""Run under torchrun by tests/test_distributed.py (not a test module itself).

    torchrun --standalone --nproc_per_node N tests/dist_worker.py grads OUT.pt
        one float64 training step on a fixed global batch: rank 0 saves the loss and gradients
    torchrun ... tests/dist_worker.py raise|kill TRAIN_FLAGS...
        train.py, with rank 1 raising an exception (or killing itself) at its second step
    torchrun ... tests/dist_worker.py pairs OUT.pt BUDGET...
        evaluation.compute_sims of a fixed model and split at each memory budget (GB): rank 0 saves
        the score matrices and the pairs each rank scored
"""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402
from model import CASC, Config  # noqa: E402

B, R, IMG_DIM, K = 7, 5, 10, 6


def global_batch():
    """A fixed float64 batch of B pairs with captions of mixed lengths, and a CASC to train."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 2, 5, 3, 7, 1, 4])
    captions = torch.randint(4, 30, (B, 7), generator=g) * (torch.arange(7) < lengths[:, None])
    images = torch.rand(B, R, IMG_DIM, generator=g, dtype=torch.float64)
    targets = (torch.rand(B, K, generator=g) > 0.5).double()
    pos_weight = torch.linspace(0.5, 3.0, K, dtype=torch.float64)
    torch.manual_seed(0)
    model = CASC(Config(vocab_size=30, word_dim=6, embed_size=8, img_dim=IMG_DIM, num_labels=K,
                        label_hidden=5)).double()
    return model, images, captions, lengths, targets, pos_weight


def step(model, images, captions, lengths, targets, pos_weight, gather=None):
    """One loss and backward, gradients averaged over the processes -> (loss, {name: grad})."""
    out = model(images, captions[:, :int(lengths.max())], lengths, targets, pos_weight, gather)
    out.loss.backward()
    parallel.average_gradients(list(model.parameters()))
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def grads(path):
    parallel.start(torch.device('cpu'))
    model, images, captions, lengths, targets, pos_weight = global_batch()
    mine = parallel.share(B, parallel.world(), parallel.rank())
    loss, g = step(model, images[mine], captions[mine], lengths[mine], targets[mine], pos_weight,
                   parallel.Gather(mine.stop - mine.start, 'cpu'))
    if parallel.is_main():
        torch.save({'loss': loss, 'grads': g}, path)
    parallel.stop()


def scoring_inputs():
    """A fixed model and split for all-pairs scoring: 23 images of 5 regions, 29 captions of 1 to 8
    words in batches of 16 and 13 -> model, encoded images (Side), caption batches."""
    from encode import encode_captions, encode_images
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = CASC(Config(vocab_size=30, word_dim=6, embed_size=8, img_dim=IMG_DIM, num_labels=K,
                        label_hidden=5)).eval()
    images = torch.rand(23, R, IMG_DIM, generator=g).numpy()
    captions = [torch.randint(4, 30, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (29,), generator=g)]
    return model, encode_images(model, images), encode_captions(model, captions, batch_size=16)


def pairs(path, budgets):
    """Each budget's score matrix (rank 0's) and the pairs every rank scored, counted at model.scores."""
    import evaluation
    parallel.start(torch.device('cpu'))
    model, img, caps = scoring_inputs()
    scores, counted = model.scores, []
    model.scores = lambda i, c, **kw: counted.append(i.emb.shape[0] * c.mask.shape[0]) or scores(i, c, **kw)
    out = {'sims': [], 'pairs': []}
    for budget in budgets:
        counted.clear()
        out['sims'].append(evaluation.compute_sims(model, img, caps, float(budget), progress=False))
        every = [None] * parallel.world()
        torch.distributed.all_gather_object(every, sum(counted))
        out['pairs'].append(every)
    if parallel.is_main():
        torch.save(out, path)
    parallel.stop()


def failing(how, argv):
    import train
    average, calls = parallel.average_gradients, []

    def average_or_fail(params):
        calls.append(1)
        if parallel.rank() == 1 and len(calls) == 2:
            if how == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError('injected failure on rank 1')
        average(params)

    parallel.average_gradients = average_or_fail
    train.main(argv)


if __name__ == '__main__':
    if sys.argv[1] == 'grads':
        grads(sys.argv[2])
    elif sys.argv[1] == 'pairs':
        pairs(sys.argv[2], sys.argv[3:])
    else:
        failing(sys.argv[1], sys.argv[2:])
