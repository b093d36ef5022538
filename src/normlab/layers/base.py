"""The base every normalization layer shares: ``num_features``, ``eps``, the per-channel
affine parameters, running buffers, the channel axis, and input validation with errors
that name the layer, what it expected and what it got.

A layer is then a few lines: declare which axes it needs, build its parameters through
the base, and call its function in ``normlab.functional``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import _moments, distributed
from .._layout import channel_axis, stat_dims
from ..engine.routing import signature


_HALF = (torch.float16, torch.bfloat16)
_MAX_CALLS = 8  # input signatures a layer remembers (a full cache is emptied, then refilled)
_NO_CALL = object()  # a remembered signature whose calls take the full path


class Norm(nn.Module):
    """Base class of normlab's normalization layers.

    Args:
        num_features: C, the size of the channel axis.
        eps: added to the variance for numerical stability; must be > 0.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0).
        channel_dim: the channel axis of the input (1 for ``(N, C, *)``, -1 for ``(N, *, C)``).
        check_finite: raise on NaN/Inf input (costs one reduction; off by default).
        bias: with ``affine``, learn the ``bias`` too (``False``: weight only, as
            ``torch.nn.LayerNorm(bias=False)``).

    Subclasses set ``min_spatial`` (how many axes besides batch and channel they need) and
    ``batch_stat_dims`` (None, or the ``over`` name of the axes whose statistics must hold
    more than one value in training; "batch" for batch norm, "spatial" for instance norm).
    """

    min_spatial: int = 0
    batch_stat_dims: str | None = None
    has_bias: bool = True
    eps_none_ok: bool = False  # RMS norms: eps=None means the input dtype's machine epsilon

    def __init__(
        self,
        num_features: int,
        eps: float | None = 1e-5,
        affine: bool = True,
        channel_dim: int = 1,
        check_finite: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.__dict__["_calls"] = {}  # input signature -> ready call (see _cached_call)
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if eps is None and not self.eps_none_ok:
            raise ValueError(f"{name}: eps must be a number > 0, got None")
        if eps is not None and not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        if not isinstance(channel_dim, int) or channel_dim == 0:
            raise ValueError(f"{name}: channel_dim must be a non-zero int (axis 0 is the batch), got {channel_dim!r}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.channel_dim = channel_dim
        self.check_finite = check_finite
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if self.has_bias and bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------- cached calls
    # On small inputs a norm routes to torch's own kernel (normlab.engine.routing), and then
    # the Python around the kernel (validation, routing, the calls through normlab.functional)
    # costs as much as the kernel. So a layer whose function can take that route decides once
    # per input signature: the first call is validated and routed in full, and the ready call of
    # torch's kernel it resolves to is kept, keyed by the signature; later calls with that
    # signature pay one dictionary lookup (DESIGN.md: "decided once per layer and input
    # signature and cached"). The key is routing.signature (shape, strides, dtype, device,
    # requires_grad, grad mode, fast_path / kernel / thread settings); the parameters and
    # buffers are read at each call (so torch.func.functional_call sees its own); everything
    # else the answer depends on empties the cache when it changes: assigning any attribute,
    # parameter or buffer (train()/eval(), momentum, eps, load_state_dict(assign=True), ...),
    # .to()/.half()/.double() and the other _apply conversions, register_buffer/_parameter.
    # Not cached at all: synchronized layers, check_finite=True, a fused activation, tensor
    # subclasses, torch.compile tracing. A copy (deepcopy, pickle) starts with an empty cache.

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[Norm, Tensor], Tensor] | None:
        """For a validated ``x``: the call of torch's kernel this layer's function makes for
        inputs of its signature, as ``f(layer, x)`` (reading the layer's tensors at each call,
        counting a training step where the layer does), or None where it takes another route.
        Layers whose function can route to torch's kernel override this and start ``forward``
        with :meth:`_cached_call`."""
        return None

    def _reads(self, *names: str) -> bool:
        """Whether each of ``names`` is a registered parameter or buffer, or None: what a ready
        call reads from the layer's dicts. Not so under parametrizations or weight-norm style
        hooks (a property, or a plain tensor attribute), and then nothing is kept."""
        d = self.__dict__
        return all(n in self._parameters or n in self._buffers or d.get(n, 0) is None for n in names)

    def _affine_call(self, f: Callable[..., Tensor] | None, bias: bool = True) -> Callable[[Norm, Tensor], Tensor] | None:
        """``f(x, weight[, bias])`` as a ready call ``g(layer, x)`` that reads the layer's
        parameters at each call, or None (no ``f``, or parameters it cannot read)."""
        if f is None or not self._reads("weight", "bias"):
            return None
        if bias:
            return lambda layer, x: f(x, layer._parameters["weight"], layer._parameters.get("bias"))
        return lambda layer, x: f(x, layer._parameters["weight"])

    def _cached_call(self, x: Tensor) -> Tensor | None:
        """The output of this call from the ready call kept for ``x``'s signature (deciding and
        keeping it on the first call of a signature), or None: the caller takes its full path."""
        if type(x) is not Tensor or torch.compiler.is_compiling():
            return None
        calls = self.__dict__["_calls"]
        key = signature(x)
        call = calls.get(key)
        if call is None:
            call = _NO_CALL
            if (getattr(self, "process_group", None) is None and not self.check_finite and not self._act()):
                call = self._torch_call(x, self.check_input(x)) or _NO_CALL
            if len(calls) >= _MAX_CALLS:
                calls.clear()
            calls[key] = call
        return None if call is _NO_CALL else call(self, x)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__.get("_calls", {}).clear()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__["_calls"].clear()

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self.__dict__.get("_calls", {}).clear()

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        self.__dict__.get("_calls", {}).clear()

    def _apply(self, fn: Callable, recurse: bool = True) -> Norm:
        self.__dict__["_calls"].clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_calls"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_calls", {})  # layers pickled before the cache existed

    # ----------------------------------------------------------------- validation
    def _describe(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    # layers whose function takes ``act=``: the activation runs in the engine's output pass
    fuses_activation = False

    def _act(self) -> dict:
        """``act``/``negative_slope`` for the function call when an activation is fused
        (``make_norm(..., act=...)``), else nothing."""
        act = self._modules.get("act") if self.fuses_activation else None
        if act is None:
            return {}
        return {"act": act.name, "negative_slope": act.negative_slope}

    def check_input(self, x: Tensor) -> int:
        """Validate ``x`` and return the channel axis as a non-negative index."""
        who = self._describe()
        sync = self._synchronized()
        if sync:  # counted before any error, so the other ranks notice a skipped step
            distributed.begin_call(self.process_group)  # type: ignore[attr-defined]
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point input, got dtype {x.dtype}")
        self._check_dtype(x, who)
        need = 2 + self.min_spatial
        if x.ndim < need:
            layout = "(N, C" + ", L" * self.min_spatial + ", ...)"
            raise ValueError(f"{who}: expected an input of rank >= {need} {layout}, got shape {tuple(x.shape)}")
        try:
            cd = channel_axis(x.ndim, self.channel_dim)
        except ValueError as err:
            raise ValueError(f"{who}: {err} (input shape {tuple(x.shape)})") from None
        if x.shape[cd] != self.num_features:
            raise ValueError(
                f"{who}: expected {self.num_features} channels along axis {cd} (channel_dim={self.channel_dim}) "
                f"of the input, got {x.shape[cd]} (input shape {tuple(x.shape)})"
            )
        # a synchronized layer's batch statistics span every process's batch, so one sample here is fine
        if self.batch_stat_dims is not None and self._uses_batch_stats() and not (
            self.batch_stat_dims == "batch" and sync
        ):
            dims = stat_dims(x.ndim, self.channel_dim, self.batch_stat_dims)  # type: ignore[arg-type]
            count = 1
            for d in dims:
                count *= x.shape[d]
            if count == 1:
                raise ValueError(
                    f"{who}: in training, statistics over axes {dims} need more than one value per channel, "
                    f"got input shape {tuple(x.shape)} (a batch of one with no other axes); "
                    f"use eval() or a per-sample norm"
                )
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError(f"{who}: input holds NaN or Inf values (check_finite=True)")
        return cd

    def _check_dtype(self, x: Tensor, who: str) -> None:
        """torch's rule, at every input size: the input's dtype is the layer's (that of its
        floating parameters and buffers), or float16/bfloat16 into a float32 layer (mixed
        precision). Anything else is refused before any state changes."""
        for t in (*self._parameters.values(), *self._buffers.values()):
            if t is not None and t.is_floating_point():
                if x.dtype != t.dtype and not (t.dtype == torch.float32 and x.dtype in _HALF):
                    raise TypeError(f"{who}: input dtype {x.dtype} does not match the layer's {t.dtype} parameters "
                                    f"and buffers; convert the input (x.to({t.dtype})) or the layer "
                                    f"(layer.to({x.dtype})); float16/bfloat16 input is accepted by a float32 layer")
                return

    def _uses_batch_stats(self) -> bool:
        """Whether this call computes statistics from the input (so they must be defined)."""
        return True

    def _synchronized(self) -> bool:
        """Whether this call all-reduces batch statistics over several processes (``process_group``)."""
        group = getattr(self, "process_group", None)
        return group is not None and self.training and distributed.is_active(group)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, affine={self.affine}"
        if self.affine and self.has_bias and self.bias is None:
            s += ", bias=False"
        if self.channel_dim != 1:
            s += f", channel_dim={self.channel_dim}"
        return s


class RunningStatsNorm(Norm):
    """A norm that keeps per-channel running statistics, with torch's names and rules.

    Buffers ``running_mean`` (init 0), ``running_var`` (init 1, stored unbiased) and
    ``num_batches_tracked``; ``momentum`` is the weight of a new batch, ``None`` for the
    cumulative average. A torch ``BatchNorm*d`` state_dict loads into it.
    """

    _version = 2  # as torch's _NormBase: version 2 added num_batches_tracked

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        channel_dim: int = 1,
        check_finite: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_dim, check_finite, device, dtype, bias=bias)
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            factory = {"device": device, "dtype": dtype}
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _counts_steps(self) -> bool:
        """Whether a call counts a training step in ``num_batches_tracked``."""
        return self.training and self.track_running_stats

    def _step_factor(self, count: bool = True) -> float | Tensor | None:
        """Count this training batch and return the running-average weight it gets.

        Call only after the input has been validated, so a bad call changes nothing.
        ``count=False``: the weight's kind only, without counting (for deciding a route).
        """
        if not self._counts_steps():
            return None
        if count:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        return _moments.running_factor(self.momentum, self.num_batches_tracked, self.running_mean.dtype)  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}, track_running_stats={self.track_running_stats}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # torch's BatchNorm state_dicts before version 2 have no num_batches_tracked
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class BatchStatNorm(RunningStatsNorm):
    """A running-statistics norm whose training statistics come from the batch.

    ``process_group`` (None: local statistics) synchronizes them across processes; see
    :func:`normlab.convert_sync`. Eval never communicates.
    """

    batch_stat_dims = "batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, channel_dim: int = 1, process_group: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, **kwargs)
        self.process_group = process_group

    def _batch_call(self, count: bool = True) -> dict[str, Any]:
        """The keywords every batch-statistic function takes, for this call.

        Counts the training step (``_step_factor``), so call it once, after validation
        (``count=False``: for deciding a route, without counting).
        """
        return {
            "training": self._uses_batch_stats(),
            "momentum": self._step_factor(count),
            "eps": self.eps,
            "channel_dim": self.channel_dim,
            "process_group": self.process_group if self.training else None,
        }

