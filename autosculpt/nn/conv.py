"""``PatternConv2d``: a drop-in for ``nn.Conv2d`` whose filters keep only some kernel taps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import conv as conv_ops
from ..ops import weight_cache
from ..patterns import PatternSet, masks_from_ids
from ..plan import LayerPlan, plan_fields, plan_index_list, register_kind
from ..reference import torch_conv_input
from ..timing import time_interleaved

# (shape, mask bytes, device, dtype, threads) -> "sparse" | "dense": decisions shared by identical layers
_PATH_DECISIONS: Dict[tuple, str] = {}


def faster_path(sparse: Callable[[], object], dense: Callable[[], object], reps: int, device=None) -> str:
    """Runs both paths once (warm-up), then ``reps`` interleaved rounds (alternating which goes first),
    and returns "sparse" or "dense", whichever had the smaller minimum: another process stealing the
    CPU can only add time, so the minimum is the stable estimate of what each path costs."""
    t = time_interleaved({"sparse": sparse, "dense": dense}, reps, warmup=1, rotate=True, device=device)
    return "sparse" if t["sparse"].min_ms <= t["dense"].min_ms else "dense"


# Attributes a cached kernel shortcut (``PatternConv2d._fast``) depends on: setting one drops them.
_FAST_CALL_SETTINGS = frozenset({"weight", "tap_mask", "bias", "stride", "padding", "dilation", "groups",
                                 "activation", "path", "backend"})


class PatternConv2d(nn.Module):
    """Convolution whose output filters each keep a subset of the kh×kw taps (``tap_mask``).

    Computes ``F.conv2d(x, weight * tap_mask[:, None], bias, ...)`` with AutoSculpt's kernels. The
    weights at dropped taps are kept at exactly zero (also after training steps: their gradient is
    zero, and :meth:`enforce_mask` re-zeroes them on demand).

    ``activation`` ("relu" or None) and the optional ``residual`` argument of ``forward`` fuse what
    usually follows a conv (``relu(conv(x) + shortcut)``) into the kernel's epilogue;
    :func:`autosculpt.fuse.fuse_for_inference` sets them up from a model's graph.

    Path: ``"auto"`` measures once per input shape whether the sparse kernel beats the dense conv and
    uses the faster (the per-layer dense fallback); ``"sparse"`` or ``"dense"`` force one. ``repr``
    shows the path in use.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        tap_mask: Optional[torch.Tensor] = None,
        backend: str = "auto",
        path: str = "auto",
        device=None,
        dtype=None,
        activation: Optional[str] = None,
    ):
        super().__init__()
        if activation not in conv_ops.ACTIVATIONS:
            raise ValueError(f"activation: expected one of {conv_ops.ACTIVATIONS}, got {activation!r}")
        kh, kw = conv_ops.as_pair(kernel_size, "kernel_size")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if path not in ("auto", "sparse", "dense"):
            raise ValueError(f"path: expected 'auto', 'sparse' or 'dense', got {path!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride = conv_ops.as_pair(stride, "stride")
        self.padding = conv_ops.as_pair(padding, "padding")
        self.dilation = conv_ops.as_pair(dilation, "dilation")
        self.groups = groups
        self.backend = backend
        self.path = path
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if tap_mask is None:
            tap_mask = torch.ones(out_channels, kh, kw, dtype=torch.bool, device=device)
        self.register_buffer("tap_mask", self._checked_mask(tap_mask).to(device=self.weight.device))
        self._cache_key = conv_ops.new_cache_key()
        self._decided: Dict[tuple, str] = {}
        self._fast: Dict[tuple, tuple] = {}  # eager CPU inference: input key -> output shape (kernel called directly)
        self._validated: set = set()  # eager inference input keys already checked by validate_conv_args
        self.enforce_mask()

    # -- construction ------------------------------------------------------------------
    def _checked_mask(self, tap_mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(tap_mask, torch.Tensor) or tap_mask.dtype != torch.bool:
            raise TypeError("tap_mask: expected a bool tensor of shape (C_out, kh, kw)")
        want = (self.out_channels, *self.kernel_size)
        if tuple(tap_mask.shape) != want:
            raise ValueError(f"tap_mask: expected shape {want}, got {tuple(tap_mask.shape)}")
        return tap_mask.detach().clone()

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, tap_mask: torch.Tensor, backend: str = "auto", path: str = "auto") -> "PatternConv2d":
        """Builds a PatternConv2d with ``conv``'s weights, keeping only the taps in ``tap_mask``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv: only numeric zero padding is supported, got padding={conv.padding!r} mode={conv.padding_mode!r}")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, tap_mask=tap_mask.to(conv.weight.device), backend=backend, path=path,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.enforce_mask()
        return layer

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (dropped taps as zero weights)."""
        if self.activation is not None:
            raise ValueError(f"to_dense: this layer has a fused activation ({self.activation!r}) that nn.Conv2d "
                             "cannot hold; convert the model before fuse_for_inference")
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight * self.tap_mask[:, None].to(self.weight.dtype))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def set_tap_mask(self, tap_mask: torch.Tensor) -> None:
        """Replaces the tap mask (re-zeroes dropped weights, forgets path decisions)."""
        self.tap_mask = self._checked_mask(tap_mask).to(self.weight.device)
        self._decided.clear()
        self._fast.clear()
        self.enforce_mask()

    def layer_plan(self) -> dict:
        """The ``"conv"`` layer plan (:class:`ConvPlan` JSON) that rebuilds this layer from its dense
        ``nn.Conv2d`` (``sparsify``): its distinct tap masks as the pattern set (``p0``, ``p1``... in
        sorted mask order), so the exact masks come back."""
        masks, ids = torch.unique(self.tap_mask.cpu(), dim=0, return_inverse=True)
        ps = PatternSet(masks, [f"p{i}" for i in range(len(masks))])
        return ConvPlan(ps, ids.tolist()).to_json()

    @torch.no_grad()
    def enforce_mask(self) -> None:
        """Sets the weights at dropped taps to exactly zero (call after an optimizer step)."""
        self.weight.mul_(self.tap_mask[:, None].to(self.weight.dtype))

    def freeze(self) -> "PatternConv2d":
        """Declares this layer's weights final (an inference snapshot, as inductor's ``freezing``):
        the kernel's packed weights are then built once instead of being compared with the live
        weights on every call. Replacing the tensors, in-place ops that bump their version counter
        and any optimizer step still rebuild them; a ``.data`` write to a frozen layer does not.
        :func:`autosculpt.fuse_for_inference` freezes the layers of the copy it returns."""
        self.__dict__["_frozen"] = True
        weight_cache.freeze(self._cache_key)
        return self

    def __setattr__(self, name, value):
        # A replaced weight or mask tensor gets a new packing-cache key, so the kernel never reuses
        # weights packed from a freed tensor that happened to live at the same address.
        if name in ("weight", "tap_mask") and "_cache_key" in self.__dict__:
            self._renew_cache_key()
        if name in _FAST_CALL_SETTINGS:
            self._forget_fast_calls()
        super().__setattr__(name, value)

    def _forget_fast_calls(self) -> None:
        """Drops the per-shape kernel shortcuts and validations (the layer's settings or tensors changed)."""
        self.__dict__.get("_fast", {}).clear()
        self.__dict__.get("_validated", set()).clear()

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype / device), .half(), .cuda()... may change the tensors in place: validate again
        out = super()._apply(fn, *args, **kwargs)
        self._forget_fast_calls()
        return out

    def _renew_cache_key(self) -> None:
        self._forget_fast_calls()
        conv_ops.release_cache(self.__dict__["_cache_key"])
        object.__setattr__(self, "_cache_key", conv_ops.new_cache_key())
        if self.__dict__.get("_frozen"):
            weight_cache.freeze(self._cache_key)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fast"] = {}  # a copy validates its first call per shape again
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # a copy (deepcopy, unpickling) caches its packed weights under its own key
        object.__setattr__(self, "_cache_key", conv_ops.new_cache_key())
        if self.__dict__.get("_frozen"):
            weight_cache.freeze(self._cache_key)
        self.__dict__.setdefault("_fast", {})
        self.__dict__.setdefault("_validated", set())

    def __del__(self):
        key = self.__dict__.get("_cache_key")
        if key and conv_ops is not None:  # module globals may already be gone at interpreter exit
            try:
                conv_ops.release_cache(key)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    # -- accounting ----------------------------------------------------------------------
    def kept_fraction(self) -> float:
        """Fraction of the dense layer's weights (and MACs) that are computed."""
        return float(self.tap_mask.float().mean())

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        return conv_ops.conv_output_size(h, w, *self.kernel_size, self.stride, self.padding, self.dilation)

    # -- forward -------------------------------------------------------------------------
    def _sparse(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return conv_ops.pattern_conv2d(
            x, self.weight, self.tap_mask, self.bias, self.stride, self.padding, self.dilation, self.groups,
            self.backend, residual=residual, activation=self.activation, _cache_key=self._cache_key,
        )

    def _dense(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self._dense_conv(x)
        if residual is None and self.activation is None:
            return out
        inplace = not (torch.is_grad_enabled() and (out.requires_grad or residual is not None and residual.requires_grad))
        return conv_ops.apply_epilogue(out, residual, self.activation, inplace=inplace and not torch.compiler.is_compiling())

    def _dense_conv(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            w = self.weight * self.tap_mask[:, None].to(self.weight.dtype)
        else:  # inference: the masked weight cached until weight or mask change (no per-call multiply)
            from ..ops.conv import masked_weight

            w = masked_weight(self.weight, self.tap_mask, self._cache_key, x)
        return F.conv2d(torch_conv_input(x), w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _decision_key(self, x: torch.Tensor) -> tuple:
        channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return (tuple(x.shape), x.dtype, x.device.type, torch.get_num_threads(), channels_last)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, reps: int = 9) -> str:
        """Times the sparse kernel and the dense conv on ``x``'s shape and remembers the faster path."""
        key = self._decision_key(x)
        shared = key + (tuple(self.weight.shape), self.stride, self.padding, self.dilation, self.groups,
                        self.tap_mask.cpu().numpy().tobytes(), self.backend)
        choice = _PATH_DECISIONS.get(shared)
        if choice is None:
            x = x.detach()
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

            def run(fn):
                return lambda: (fn(x), sync())

            # the conv alone: the epilogue costs both paths about the same
            choice = faster_path(run(self._sparse), run(self._dense_conv), reps)
            _PATH_DECISIONS[shared] = choice
        self._decided[key] = choice
        return choice

    def active_path(self, x: Optional[torch.Tensor] = None) -> str:
        """The path used for ``x`` (or the only decided one): "sparse", "dense" or "undecided"."""
        if self.path != "auto":
            return self.path
        if x is not None:
            return self._decided.get(self._decision_key(x), "undecided")
        paths = set(self._decided.values())
        return paths.pop() if len(paths) == 1 else ("undecided" if not paths else "mixed")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``activation(conv(x) + residual)``; ``x`` is (N, C_in, H, W) or unbatched (C_in, H, W), as
        ``nn.Conv2d`` takes it (``residual`` then 3-D too).

        Under ``torch.fx`` tracing and ``torch.compile`` the layer is one call of the custom op (plus the
        epilogue as torch ops): no graph break, nothing that depends on eager caches or thread counts."""
        if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():
            return self._graph_forward(x, residual)
        if isinstance(x, torch.Tensor) and x.ndim == 3:
            if residual is not None and isinstance(residual, torch.Tensor) and residual.ndim != 3:
                raise ValueError(f"residual: expected 3-D (C_out, H_out, W_out) for an unbatched x, got shape {tuple(residual.shape)}")
            return self.forward(x[None], None if residual is None else residual[None])[0]
        fast_key = None
        if not torch.is_grad_enabled() and type(x) is torch.Tensor and x.is_cpu:
            # eager CPU inference: after one validated call per input shape, go straight to the kernel.
            # (The key holds what the call may change; the layer's own settings, tensors, dtype and
            # device clear ``_fast`` when they change: __setattr__, set_tap_mask, _apply.)
            fast_key = (x.shape, x.stride(), x.dtype, torch.get_num_threads(), self.path, self.backend, self.activation)
            fast = self._fast.get(fast_key)
            if fast is not None:
                return self._fast_cpu(x, residual, fast)
        checked_key = None if fast_key is None else (fast_key, None if residual is None else
                                                      (residual.shape, residual.dtype, residual.device))
        if checked_key is None or checked_key not in self._validated:
            # both paths raise the same clear errors (the dense one would otherwise raise torch's own)
            self._check_input(x, residual)
            if checked_key is not None:
                self._validated.add(checked_key)
        path = self.path
        if path == "auto":
            path = self._decided.get(self._decision_key(x)) or self.calibrate(x)
        if path != "sparse":
            return self._dense(x, residual)
        out = self._sparse(x, residual)
        if fast_key is not None:
            self._remember_fast_call(fast_key, x)
        return out

    def _graph_forward(self, x, residual):
        """The layer as graph ops (fx tracing, dynamo): the custom op for the sparse path, a masked
        ``F.conv2d`` for the dense one. Under ``path="auto"`` the path measured eagerly is used when
        every measured shape agreed (call the model once eagerly, or :meth:`calibrate`), else sparse."""
        path = self.path
        if path == "auto":
            decided = set(self._decided.values())
            path = decided.pop() if len(decided) == 1 else "sparse"
        if path == "dense":
            w = self.weight * self.tap_mask[:, None].to(self.weight.dtype)
            out = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = torch.ops.autosculpt.pattern_conv2d(
                x, self.weight, self.tap_mask, self.bias, list(self.stride), list(self.padding), list(self.dilation),
                self.groups, self.backend, self._cache_key)
        return conv_ops.apply_epilogue(out, residual, self.activation, inplace=False)

    def _check_input(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        conv_ops.validate_conv_args(x, self.weight, self.tap_mask, self.bias, self.stride, self.padding,
                                    self.dilation, self.groups)
        conv_ops.validate_epilogue(x, self.weight, residual, self.activation, self.stride, self.padding,
                                   self.dilation)

    def _remember_fast_call(self, key: tuple, x: torch.Tensor) -> None:
        """Remembers that calls with this input shape may go straight to the C++ kernel (when the op
        would pick it), with the output shape a residual must have."""
        backend = conv_ops.resolve_backend(self.backend, x, self.weight, self.tap_mask, self.stride, self.padding,
                                           self.dilation, self.groups)
        if backend == "cpu":
            out_shape = (x.shape[0], self.out_channels, *self.output_size(x.shape[2], x.shape[3]))
            run = conv_ops.cpu_kernel_runner(x, self.weight, self.tap_mask, self.bias, self.stride, self.padding,
                                             self.dilation, self.groups, self._cache_key, self.activation == "relu")
            self._fast[key] = (out_shape, run)

    def _fast_cpu(self, x: torch.Tensor, residual: Optional[torch.Tensor], fast: tuple) -> torch.Tensor:
        """The op's CPU backend without its per-call validation (done once for this input shape):
        ``fast`` is (output shape, :func:`autosculpt.ops.conv.cpu_kernel_runner` for this shape)."""
        out_shape, run = fast
        if residual is not None and (residual.shape != out_shape or residual.dtype != x.dtype or not residual.is_cpu):
            conv_ops.validate_epilogue(x, self.weight, residual, self.activation, self.stride, self.padding,
                                        self.dilation)
        return run(x, residual)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.activation is not None:
            s += f", activation={self.activation}"
        return s + f", kept={self.kept_fraction():.3f}, backend={self.backend}, path={self.active_path()}"


# --------------------------------------------------------------------------- plans

_PATHS = ("auto", "sparse", "dense")


@dataclass(frozen=True)
class ConvPlan(LayerPlan):
    """The ``"conv"`` layer plan: an ``nn.Conv2d`` becomes a :class:`PatternConv2d` whose filter ``o``
    keeps the taps of ``pattern_set.masks[pattern_ids[o]]``.

    JSON: ``{"kind": "conv", "pattern_set": PatternSet.to_json(), "pattern_ids": [C_out ints]}``, plus
    ``"path": "sparse" | "dense"`` when the layer's path is forced (``"auto"`` is not written).
    """

    kind: ClassVar[str] = "conv"
    pattern_set: PatternSet
    pattern_ids: Tuple[int, ...]
    path: str = "auto"

    def __post_init__(self):
        if not isinstance(self.pattern_set, PatternSet):
            raise ValueError(f"pattern_set: expected a PatternSet, got {type(self.pattern_set).__name__}")
        object.__setattr__(self, "pattern_ids", plan_index_list(self.pattern_ids, "pattern_ids", len(self.pattern_set)))
        if self.path not in _PATHS:
            raise ValueError(f"path: expected one of {', '.join(map(repr, _PATHS))}, got {self.path!r}")

    def to_json(self) -> dict:
        out = {"kind": "conv", "pattern_set": self.pattern_set.to_json(), "pattern_ids": list(self.pattern_ids)}
        if self.path != "auto":
            out["path"] = self.path
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ConvPlan":
        plan_fields(data, "conv", ("pattern_set", "pattern_ids"), ("path",))
        try:
            ps = PatternSet.from_json(data["pattern_set"])
        except (TypeError, RuntimeError, KeyError) as e:  # torch.tensor of garbage, missing keys
            raise ValueError(f"pattern_set: {e}") from None
        return cls(ps, data["pattern_ids"], data.get("path", "auto"))

    def apply(self, module: nn.Module, backend: str) -> nn.Module:
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"a 'conv' layer plan needs an nn.Conv2d, found {type(module).__name__}")
        if len(self.pattern_ids) != module.out_channels:
            raise ValueError(f"pattern_ids: expected {module.out_channels} ids, got {len(self.pattern_ids)}")
        if self.pattern_set.kernel_size != tuple(module.kernel_size):
            raise ValueError(f"pattern_set: kernel {self.pattern_set.kernel_size} does not match the conv's "
                             f"{tuple(module.kernel_size)}")
        return PatternConv2d.from_dense(module, masks_from_ids(self.pattern_set, self.pattern_ids), backend=backend,
                                        path=self.path)


register_kind(ConvPlan)
