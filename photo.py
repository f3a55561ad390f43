"""An uploaded photo -> region features made as the gallery's were: features.py's extractor
(imagefiles.py's decoding, extractor.py's networks), built from the settings record features.py
writes beside the features ({split}_ims.json, read by featstore.py). A gallery that features.py did
not make (SCAN's bottom-up files), or whose record does not match its features file, takes no
uploads, and `why_not` says why (the server answers uploads with it)."""
import io
import os
import sys

import torch
from PIL import Image

import util
from extractor import RECIPE, build_models, extract
from featstore import fingerprint, read_record
from imagefiles import Images


class Photos:
    """Region features of one photo at a time (the server calls .features from its one model thread)."""

    def __init__(self, ims_path: str, split: str, device='cpu', log=None):
        self.device, self.trunk, self.detector = torch.device(device), None, None
        self.why_not, record = self._record(ims_path, split)
        if self.why_not:
            return
        self.settings, self.max_pixels = record['settings'], record['max_pixels']
        try:  # the gallery's own weights: torchvision's (cached), a local file, or the seeded random ones
            self.trunk, self.detector = build_models(self.settings, self.device)
        except ValueError as e:
            self.why_not = f'the extractor that made {ims_path} cannot be loaded here ({e})'
            print(f'warning: uploads are off: {self.why_not}', file=log or sys.stderr, flush=True)

    @staticmethod
    def _record(ims_path: str, split: str) -> tuple:
        """-> (why uploads are off or None, the record)."""
        path = os.path.join(os.path.dirname(ims_path), f'{split}_ims.json')
        try:
            record = read_record(path)
        except ValueError as e:
            return str(e), None
        if record is None:
            return (f'{ims_path} was not made by features.py (no settings record {path} beside it), so a photo '
                    f'cannot be put through the extractor that made it (SCAN\'s bottom-up features, for one)'), None
        if record['settings'].get('recipe') != RECIPE:
            return (f'{ims_path} was made by another version of features.py (recipe {record["settings"].get("recipe")}, '
                    f'this one makes {RECIPE}): run features.py --overwrite on the split'), None
        if record['fingerprints'].get('ims') != fingerprint(ims_path):
            return f'{path} records other features than {ims_path} holds now (rerun features.py on the split)', None
        return None, record

    @torch.inference_mode()
    def features(self, data: bytes) -> torch.Tensor:
        """A picture file's bytes -> (1, 36, 2048) float32 on the CPU, as features.py computes them
        (imagefiles.Images's decoding and resizing, extractor.extract); ValueError when it is no
        picture Pillow reads or has more than the gallery's --max_pixels."""
        s = self.settings
        images = Images([io.BytesIO(data)], s['image_size'], self.max_pixels, s['detector_size'] or 0)
        try:
            x, det = images[0]  # (3, h, w) normalized, the detector's input or None
        except Image.UnidentifiedImageError:
            raise ValueError('not a picture file Pillow can read') from None
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f'cannot decode it ({" ".join(str(e).split())})') from None
        with util.precision_scope('fp32'):  # as features.py's run: no TF32 on a GPU, whatever the caller's flags
            feats, _ = extract(self.trunk, self.detector, [x], [det], self.device)  # (1, 36, 2048), boxes
        return feats.float().cpu()
