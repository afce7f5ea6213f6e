"""Feature networks for FID, KID, precision/recall and the feature-space memorisation audit: user-supplied
Inception-v3 or ResNet-50 weights (safetensors, or PyTorch files loaded weights-only), checked to fit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..errors import UsageError, WsigenError
from . import Progress

ARCHS = ("auto", "inception", "inception-fid", "resnet50")


def device_for(name: str):
    """The torch device feature networks run on (``--device``: auto, cpu, cuda)."""
    from ..run.devices import resolve_device

    return resolve_device(name)


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from safetensors, or from a PyTorch file with ``torch.load(weights_only=True)``."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise WsigenError(f"feature weights not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WsigenError(f"{p}: cannot read safetensors weights ({e})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and version errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WsigenError(f"{p}: cannot read PyTorch weights with weights_only=True ({first}); "
                              "convert them to safetensors") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):  # common training wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WsigenError(f"{p} does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def detect_arch(state: dict) -> str:
    if "Mixed_7c.branch_pool.conv.weight" in state:
        fc = state.get("fc.weight")
        return "inception-fid" if fc is not None and fc.shape[0] == 1008 else "inception"
    if "layer4.2.conv3.weight" in state and "layer3.5.conv3.weight" in state:
        return "resnet50"
    raise WsigenError("feature weights match no supported architecture (Inception-v3 or ResNet-50 "
                      "with torchvision's parameter names); pass --features-arch if they are one")


def build_feature_net(arch: str, num_classes: int = 1000):
    from ..nets.inception import Inception3
    from ..nets.resnet import ResNet50

    if arch in ("inception", "inception-fid"):
        return Inception3(num_classes=num_classes, aux_logits=True, fid=arch == "inception-fid")
    if arch == "resnet50":
        return ResNet50(num_classes=num_classes)
    raise UsageError(f"--features-arch must be one of {', '.join(ARCHS)} (got {arch!r})")


# Heads that feature extraction never uses: absent or differently shaped, they are ignored.
_HEADS = ("fc.", "AuxLogits.")


def load_feature_net(path, arch: str = "auto", input_size: int | None = None):
    """(network in eval mode, description) for user-supplied weights; every trunk weight must load."""
    import torch

    state = read_state_dict(path)
    arch = detect_arch(state) if arch == "auto" else arch
    fc = state.get("fc.weight")
    with torch.device("meta"):  # no random initialisation: every weight that is used comes from the file
        net = build_feature_net(arch, int(fc.shape[0]) if fc is not None else 1000)
    net = net.to_empty(device="cpu")
    for t in net.state_dict().values():  # heads the file lacks stay defined (zeros), never used
        t.zero_()
    own = net.state_dict()
    trunk = [k for k in own if not k.startswith(_HEADS) and not k.endswith("num_batches_tracked")]
    missing = [k for k in trunk if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(_HEADS)]
    wrong = [k for k in trunk if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise WsigenError(f"{path}: weights do not fit {arch}: " + "; ".join(parts))
    bad = [k for k in trunk if state[k].is_floating_point() and not torch.isfinite(state[k]).all()]
    if bad:
        raise WsigenError(f"{path}: weights contain NaN/Inf ({bad[0]})")
    load = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    net.load_state_dict(load, strict=False)
    if input_size:
        net.input_size = int(input_size)
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return net.eval(), {"arch": arch, "weights": str(path), "sha256": sha,
                        "input_size": net.input_size, "dim": net.features_dim}


def extract_features(net, images: np.ndarray, device, batch: int = 16,
                     progress: Progress | None = None, what: str = "features") -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).to(device).permute(0, 3, 1, 2).float()
            out.append(net(net.prepare(x)).double().cpu().numpy())
            if progress:
                progress(what, min(i + batch, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros((0, net.features_dim))
