"""Running an exported cascade (``cascade.json`` + per-stage ONNX files) with onnxruntime: no checkpoint needed.

The batched gather/scatter and the confidence scores are those of :mod:`hydravit.cascade`; each stage is an
onnxruntime session behind the same batch -> logits interface as a PyTorch stage. Stage storage kinds are a
registry (:data:`STAGE_LOADERS`, keyed by the manifest's ``artefact``), so one switchable ONNX file for every k
can be added as another loader without touching the runtime.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Union

import numpy as np
import torch

from ..cascade.policy import CascadePolicy
from ..cascade.runner import Cascade, CascadeOutput, Stage
from .export import CASCADE_MANIFEST, ExportError, file_sha256

__all__ = ['OnnxCascade', 'STAGE_LOADERS', 'register_stage_loader']

PathLike = Union[str, os.PathLike]
StageLoader = Callable[[Path, Mapping[str, Any], List[str]], List[Stage]]
STAGE_LOADERS: Dict[str, StageLoader] = {}


def register_stage_loader(artefact: str) -> Callable[[StageLoader], StageLoader]:
    def register(fn: StageLoader) -> StageLoader:
        STAGE_LOADERS[artefact] = fn
        return fn
    return register


def _session_forward(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: array})[0])
    return forward


@register_stage_loader('per-stage-onnx')
def _per_stage_onnx(folder: Path, manifest: Mapping[str, Any], providers: List[str]) -> List[Stage]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError('the cascade runtime needs onnxruntime: pip install "hydravit[onnx]"') from e
    stages = []
    for entry in manifest['stages']:
        path = folder / entry['onnx']
        if not path.is_file():
            raise FileNotFoundError(f'cascade stage k={entry["k"]}: {path} does not exist')
        if entry.get('sha256') and file_sha256(path) != entry['sha256']:
            raise ExportError(f'{path}: checksum differs from {CASCADE_MANIFEST} (file changed after export)')
        session = ort.InferenceSession(str(path), providers=providers)
        stages.append(Stage(int(entry['k']), _session_forward(session), int(entry['macs'])))
    return stages


class OnnxCascade:
    """``OnnxCascade(folder)(images) -> CascadeOutput``: an exported cascade served by onnxruntime."""

    def __init__(self, folder: PathLike, *, providers: Union[List[str], None] = None) -> None:
        self.folder = Path(folder)
        path = self.folder / CASCADE_MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f'{path} does not exist: export a cascade with hydravit export --cascade')
        manifest = json.loads(path.read_text())
        artefact = manifest.get('artefact')
        if artefact not in STAGE_LOADERS:
            raise ValueError(f'{path}: unknown cascade artefact {artefact!r} (this runtime reads '
                             f'{sorted(STAGE_LOADERS)})')
        self.manifest = manifest
        self.policy = CascadePolicy.from_dict(manifest['policy'])
        self.preprocessing = manifest.get('pretrained_cfg', {})
        self.stages = STAGE_LOADERS[artefact](self.folder, manifest, providers or ['CPUExecutionProvider'])
        self.cascade = Cascade(self.stages, self.policy)

    def set_policy(self, policy: CascadePolicy) -> None:
        """Other thresholds (or a sub-list of the stages) without reloading a session."""
        self.cascade = Cascade(self.stages, policy)
        self.policy = policy

    def __call__(self, images: Union[torch.Tensor, np.ndarray]) -> CascadeOutput:
        x = torch.as_tensor(images, dtype=torch.float32)
        return self.cascade(x)
