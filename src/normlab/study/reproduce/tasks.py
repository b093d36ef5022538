"""The claims' own study tasks: real data sets (offline) and the models the papers compare,
each behind the study's ``Task`` interface, so a claim's arm is an ordinary ``CellConfig``
run by ``run_cell`` and stored like any study cell. Their names start with ``reproduce/``
(``get_task`` loads this module when it meets one); the ``norm`` field of a cell selects
the model variant where it is not a registry spec (``lstm``, ``selu``, ``spdbn``, ...).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ...layers import (BatchInstanceNorm, BatchNormLSTM, BiMap, GeneralizedHammingConv2d, LayerNormLSTM, LogEig,
                       ReEig, SPDBatchNorm, weight_norm)
from ...selfnorm import self_normalizing
from ..tasks import FashionMNIST, Split, Task

__all__ = ["get_claim_task", "claim_task_names", "CONTRAST_SHIFT", "CONTRAST_LEVELS"]

# Claim 7 (a): test images seen with contrast x0.5 and brightness +0.3 (pixels in [0, 1])
CONTRAST_SHIFT = (0.5, 0.3)
# Claim 7 (b): each image's pixels scaled by one of these; the label is which
CONTRAST_LEVELS = (0.25, 0.5, 0.75, 1.0)


def _variant(task: Task, spec: str, allowed: tuple[str, ...]) -> str:
    if spec not in allowed:
        raise ValueError(f"task {task.name!r}: the norm field selects the model variant, one of "
                         f"{', '.join(allowed)}; got {spec!r}")
    return spec


def _sklearn_table(loader: str) -> tuple[np.ndarray, np.ndarray]:
    """A scikit-learn data set shipped with the package (``load_digits``, ...) as a table."""
    import sklearn.datasets

    d = getattr(sklearn.datasets, loader)()
    return d.data.astype(np.float32), d.target.astype(np.int64)


class _StandardizedInputs:
    """Inputs standardized per feature with the training split's mean and std (float64)."""

    def _split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str) -> Split:
        split = super()._split(seed, val_fraction, val_max, train_subset, data_dir)  # type: ignore[misc]
        x = split.x_train.double()
        mean, std = x.mean(0), x.sub(x.mean(0)).square().mean(0).sqrt().clamp_min(1e-12)
        f = lambda t: ((t.double() - mean) / std).float()  # noqa: E731
        return Split(f(split.x_train), split.y_train, f(split.x_val), split.y_val)


class FashionWN(FashionMNIST):
    """Claim 5: the Fashion-MNIST CNN with every conv weight-normalized (w = g v/||v||)."""

    name = "reproduce/fashion-wn"

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        model = super().build_model(norm_spec, width)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                weight_norm(m)
        return model


class FashionWS(FashionMNIST):
    """Claim 14: the Fashion-MNIST CNN with spec ``NORM+ws``: the norm ``NORM`` after every conv,
    and every conv weight-standardized (Qiao et al. 2019) by ``normlab.weight_standardize``."""

    name = "reproduce/fashion-ws"

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        if not norm_spec.endswith("+ws"):
            raise ValueError(f"task {self.name!r}: expected a 'NORM+ws' spec, got {norm_spec!r}")
        try:
            from ... import weight_standardize  # type: ignore[attr-defined]
        except ImportError:
            raise ValueError("weight standardization (normlab.weight_standardize) is not in this normlab") from None
        model = super().build_model(norm_spec[: -len("+ws")], width)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                weight_standardize(m)
        return model


class FashionContrastShift(FashionMNIST):
    """Claim 7 (a): trained on ordinary images; the validation set is each validation image
    twice, as is and with contrast and brightness changed (p -> clip(0.5 p + 0.3, 0, 1)).
    The metric is the accuracy lost: error on the changed images minus error on the originals."""

    name = "reproduce/fashion-contrast-shift"
    metric = "error increase"

    def _split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str) -> Split:
        s = super()._split(seed, val_fraction, val_max, train_subset, data_dir)
        c, b = CONTRAST_SHIFT
        shifted = ((c * (s.x_val * 0.5 + 0.5) + b).clamp(0, 1) - 0.5) / 0.5
        return Split(s.x_train, s.y_train, torch.cat([s.x_val, shifted]), torch.cat([s.y_val, s.y_val]))

    def score(self, out: Tensor, y: Tensor, split: Split) -> float:
        wrong = (out.argmax(1) != y).double()
        n = len(y) // 2
        return (wrong[n:].mean() - wrong[:n].mean()).item()


class FashionContrastLabel(FashionMNIST):
    """Claim 7 (b): every image's pixels multiplied by one of ``CONTRAST_LEVELS`` (drawn once,
    fixed); the label is the contrast level (4 classes, chance error 0.75)."""

    name = "reproduce/fashion-contrast-label"
    num_classes = len(CONTRAST_LEVELS)

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        x, _ = super().arrays(data_dir)
        level = np.random.default_rng(20260).integers(0, len(CONTRAST_LEVELS), len(x))
        pixels = (x * 0.5 + 0.5) * np.asarray(CONTRAST_LEVELS, dtype=np.float32)[level][:, None, None, None]
        return (pixels - 0.5) / 0.5, level.astype(np.int64)


class _RhoReadout(nn.Module):
    """The model's logits with one more column: the mean gate rho of its batch-instance norms."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.gates = [m for m in model.modules() if isinstance(m, BatchInstanceNorm)]

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        rho = torch.cat([g.rho.detach().clamp(0, 1) for g in self.gates]).mean()
        return torch.cat([out, rho.expand(len(out), 1)], 1)


class _RhoMixin:
    """Claim 7 (b): train with ``bin`` as usual; the metric is the mean rho after training
    (1 = batch norm, 0 = instance norm), read from the extra output column."""

    metric = "mean rho"

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        if norm_spec != "bin":
            raise ValueError(f"task {self.name!r} reads the gates of batch-instance norm: norm must be 'bin', "  # type: ignore[attr-defined]
                             f"got {norm_spec!r}")
        return _RhoReadout(super().build_model(norm_spec, width))  # type: ignore[misc]

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return super().loss(out[:, :-1], y)  # type: ignore[misc]

    def score(self, out: Tensor, y: Tensor, split: Split) -> float:
        return out[:, -1].double().mean().item()


class FashionRho(_RhoMixin, FashionMNIST):
    name = "reproduce/fashion-rho"


class FashionContrastLabelRho(_RhoMixin, FashionContrastLabel):
    name = "reproduce/fashion-contrast-label-rho"


class FashionGHN(FashionMNIST):
    """Claim 11: the Fashion-MNIST CNN with generalized Hamming convolutions (bias fixed by
    the generalized Hamming distance) and no norm layer."""

    name = "reproduce/fashion-ghn"

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        _variant(self, norm_spec, ("ghn",))
        layers: list[nn.Module] = []
        c = self.in_channels
        for m, s in zip(self.widths, self.strides):
            layers += [GeneralizedHammingConv2d(c, width * m, 3, stride=s, padding=1), nn.ReLU()]
            c = width * m
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, self.num_classes))


class _Tabular(Task):
    kind = "mlp"

    def build_model(self, norm_spec: str, width: int = 64) -> nn.Module:
        _variant(self, norm_spec, ("none",))
        d = self.input_shape[0]
        return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, self.num_classes))


class CancerRaw(_Tabular):
    """Claim 8: scikit-learn's breast-cancer set (569 x 30 features, from ~1e-3 to ~4e3),
    features as they come; a 2-hidden-layer ReLU MLP."""

    name = "reproduce/cancer-raw"
    input_shape = (30,)
    num_classes = 2

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        return _sklearn_table("load_breast_cancer")


class CancerStandardized(_StandardizedInputs, CancerRaw):
    """Claim 8: the same, each feature standardized with the training split's mean and std."""

    name = "reproduce/cancer-std"


class DigitsDeepMLP(_StandardizedInputs, Task):
    """Claim 9: the 8x8 digits as a table (UCI's optical digits: 64 features), standardized
    with the training split's statistics; a 16-layer MLP without norm layers, either ReLU
    with He-normal init or SELU with LeCun-normal init (``normlab.self_normalizing``)."""

    name = "reproduce/digits-mlp16"
    kind = "mlp"
    input_shape = (64,)
    depth = 16

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        return _sklearn_table("load_digits")

    def build_model(self, norm_spec: str, width: int = 64) -> nn.Module:
        act = _variant(self, norm_spec, ("relu", "selu"))
        layers: list[nn.Module] = []
        d = self.input_shape[0]
        for _ in range(self.depth - 1):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        model = nn.Sequential(*layers, nn.Linear(d, self.num_classes))
        if act == "selu":
            return self_normalizing(model)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    m.bias.zero_()
        return model


class _SequenceClassifier(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class SequentialDigits(Task):
    """Claim 6: each 8x8 digit read pixel by pixel (a sequence of 64 scalars, row-major), an
    LSTM of ``width`` units and a linear classifier on its last output: a plain LSTM
    (``nn.LSTM``), layer-normalized (Ba et al.) or batch-normalized (Cooijmans et al.)."""

    name = "reproduce/seq-digits"
    kind = "rnn"
    input_shape = (64, 1)

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = _sklearn_table("load_digits")
        return ((x / 16.0 - 0.5) / 0.5)[:, :, None], y

    def build_model(self, norm_spec: str, width: int = 64) -> nn.Module:
        kind = _variant(self, norm_spec, ("lstm", "ln-lstm", "bn-lstm"))
        steps, features = self.input_shape
        if kind == "lstm":
            rnn: nn.Module = nn.LSTM(features, width, batch_first=True)
        elif kind == "ln-lstm":
            rnn = LayerNormLSTM(features, width, batch_first=True)
        else:
            rnn = BatchNormLSTM(features, width, max_length=steps, batch_first=True)
        return _SequenceClassifier(rnn, width, self.num_classes)


def covariance_descriptors(images: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Region covariance descriptors (Tuzel, Porikli & Meer, ECCV 2006) of whole images
    (N, H, W) in [0, 1]: per pixel the features (x, y, I, |I_x|, |I_y|, |I_xx|, |I_yy|), their
    7x7 covariance over the image's pixels (float64), plus ``ridge`` * I so that it is SPD."""
    n, h, w = images.shape
    ys, xs = np.meshgrid(np.arange(h) / (h - 1), np.arange(w) / (w - 1), indexing="ij")
    iy, ix = np.gradient(images, axis=(1, 2))
    iyy = np.gradient(iy, axis=1)
    ixx = np.gradient(ix, axis=2)
    feats = np.stack([np.broadcast_to(xs, images.shape), np.broadcast_to(ys, images.shape), images,
                      np.abs(ix), np.abs(iy), np.abs(ixx), np.abs(iyy)], axis=-1).reshape(n, h * w, 7)
    centred = feats - feats.mean(1, keepdims=True)
    cov = np.einsum("npi,npj->nij", centred, centred) / (h * w - 1)
    return cov + ridge * np.eye(7)


class DigitsCovariance(Task):
    """Claim 12: each 8x8 digit as its 7x7 region covariance descriptor (SPD); an SPD network
    BiMap(7->6) [SPD BN] ReEig BiMap(6->4) [SPD BN] ReEig LogEig, then a linear classifier on
    the 16 entries. ``spdbn``: with the Riemannian batch norms; ``none``: without."""

    name = "reproduce/digits-cov"
    kind = "spd"
    input_shape = (7, 7)

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return covariance_descriptors(d.images / 16.0).astype(np.float32), d.target.astype(np.int64)

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        bn = _variant(self, norm_spec, ("spdbn", "none")) == "spdbn"
        norm = SPDBatchNorm if bn else (lambda n: nn.Identity())
        return nn.Sequential(BiMap(7, 6), norm(6), ReEig(1e-4), BiMap(6, 4), norm(4), ReEig(1e-4), LogEig(),
                             nn.Flatten(), nn.Linear(16, self.num_classes))


_TASKS: dict[str, Task] = {t.name: t for t in (
    FashionWN(), FashionWS(), FashionContrastShift(), FashionContrastLabel(), FashionRho(), FashionContrastLabelRho(),
    FashionGHN(), CancerRaw(), CancerStandardized(), DigitsDeepMLP(), SequentialDigits(), DigitsCovariance())}


def claim_task_names() -> list[str]:
    return sorted(_TASKS)


def get_claim_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; the reproduce tasks are: {', '.join(claim_task_names())}")
    return _TASKS[name]
