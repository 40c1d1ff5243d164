"""The channel structure of a model, read off one eager forward pass.

:func:`trace_model` runs the model once on an example batch under a ``TorchFunctionMode`` and
follows every tensor from the op that made it to the ops that use it. It needs no symbolic tracing,
so models with Python control flow (shape checks, loops) work. What it records:

- every ``nn.Conv2d`` and ``nn.Linear`` call (a *layer*), in execution order, with its shapes;
- the BatchNorm applied to a layer's output and the first activation module after it (with the
  call index when a module is reused, as torchvision's ResNet reuses ``relu``): the read-out points;
- *channel spaces*: a layer's output channels form a space; BatchNorm, activations, pooling and
  dropout keep it; an element-wise op between two tensors (residual add, SE scaling) couples their
  spaces; a depthwise conv couples its input and output; ``torch.cat`` along channels makes a
  space of segments; flatten before a Linear expands each channel into H*W features.
  A space reaching an op the tracer does not model is marked *opaque*.

From these follow the producers of a layer's input channels (SFVR), the layers coupled with a
layer (group reductions, masking), and its consumers.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

_CONV = {torch.conv2d}
_LINEAR = {F.linear}
_BATCH_NORM = {F.batch_norm}
_NORMS = {F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
_ACTIVATIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh,
    F.hardtanh_, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    Tensor.sigmoid, torch.tanh, Tensor.tanh, F.tanh, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_,
    F.selu, F.celu, F.mish, F.softplus, F.prelu, F.rrelu, F.logsigmoid, F.softsign, F.tanhshrink,
}
_KEEP = {  # ops that keep the channel axis and the channel order
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d,
    F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout,
    F.interpolate, F.upsample, torch.clone, Tensor.clone, Tensor.contiguous, Tensor.float,
    Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.to, Tensor.detach, torch.detach,
    Tensor.__neg__, torch.neg, torch.abs, Tensor.abs,
}
_BINARY = {
    torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
    torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
    torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
    torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__,
}
_CAT = {torch.cat, torch.concat}
_RESHAPE = {torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape}
_PERMUTE = {torch.permute, Tensor.permute}
_TRANSPOSE = {torch.transpose, Tensor.transpose}
_REDUCE = {torch.mean, Tensor.mean, torch.sum, Tensor.sum, torch.amax, Tensor.amax}
_ACTIVATION_MODULES = tuple(
    c for c in vars(nn.modules.activation).values()
    if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module)


@dataclasses.dataclass
class LayerNode:
    """One conv or linear layer as the tracer saw it."""

    name: str
    kind: str                       # "conv" or "linear"
    order: int                      # position in execution order
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Tuple[int, ...]    # (kh, kw); () for linear
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    input_shape: Tuple[int, ...]    # one sample, batch dim dropped
    output_shape: Tuple[int, ...]
    channel_dim: int                # channel axis of the output, batch dim included (1 or -1)
    space: int = -1                 # channel space of the output
    input_space: Optional[int] = None   # channel space of the input (None: model input / opaque)
    input_offset: int = 0           # where this layer's input starts inside a concatenated space
    input_expand: int = 1           # features per input channel (Linear after flatten: H*W)
    bn: Optional[str] = None        # BatchNorm module applied to the output
    bn_call: int = 0                # which call of that module (0 = first of a forward)
    act: Optional[str] = None       # first activation module after the output (and BN)
    act_call: int = 0
    is_output: bool = False         # produces the model's output (the classifier)

    @property
    def depthwise(self) -> bool:
        """A conv with one group per channel (groups == in_channels == out_channels)."""
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclasses.dataclass
class _Space:
    size: int
    segments: Optional[List[Tuple[int, int, int]]] = None  # concat: (space, offset, size)
    opaque: bool = False
    # BatchNorms applied to the channels (possibly as part of a concatenation): (module, offset
    # of channel 0 in the module's channels); normalisations that mix or shift channels
    bns: List[Tuple[str, int]] = dataclasses.field(default_factory=list)
    norms: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _State:
    """What the tracer knows of one tensor."""

    space: Optional[int]            # channel space of the channel axis, None if unknown
    cdim: int                       # channel axis (batch dim included), negative-safe
    expand: int = 1                 # features per channel after a flatten
    source: Optional[Tuple[str, str]] = None  # (layer, "pre_bn" | "post_bn" | "post_act")


class ModelGraph:
    """Result of :func:`trace_model`: layers in execution order and their channel spaces."""

    def __init__(self):
        self.layers: Dict[str, LayerNode] = {}
        self._spaces: List[_Space] = []
        self._parent: List[int] = []
        self._modules: Dict[str, nn.Module] = {}

    # -------------------------------------------------------------- spaces (union-find)
    def _new_space(self, size, segments=None) -> int:
        self._spaces.append(_Space(size, segments))
        self._parent.append(len(self._parent))
        return len(self._parent) - 1

    def root(self, space: int) -> int:
        """The representative of ``space``'s set of coupled channel spaces (union-find)."""
        while self._parent[space] != space:
            self._parent[space] = self._parent[self._parent[space]]
            space = self._parent[space]
        return space

    def _union(self, a: int, b: int) -> int:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)
            keep, gone = self._spaces[min(ra, rb)], self._spaces[max(ra, rb)]
            keep.opaque |= gone.opaque
            keep.bns += [b for b in gone.bns if b not in keep.bns]
            keep.norms += [n for n in gone.norms if n not in keep.norms]
        return min(ra, rb)

    def _mark_opaque(self, space: int):
        self._spaces[self.root(space)].opaque = True
        for seg, _, _ in self._spaces[space].segments or ():
            self._mark_opaque(seg)

    def is_opaque(self, layer: str) -> bool:
        """Whether the layer's output channels reach an op the tracer does not model."""
        return self._spaces[self.root(self.layers[layer].space)].opaque

    def batch_norms(self, layer: str) -> List[Tuple[str, int]]:
        """Every BatchNorm applied to the layer's output channels (after residual adds and
        concatenations too): (module name, index of the layer's channel 0 in its channels)."""
        return list(self._spaces[self.root(self.layers[layer].space)].bns)

    def normalizations(self, layer: str) -> List[str]:
        """LayerNorm / GroupNorm / InstanceNorm / LRN modules (or ``F.*`` calls, as "<functional>")
        that normalise the layer's output channels together: zeroing a channel there does not
        zero its output."""
        return list(self._spaces[self.root(self.layers[layer].space)].norms)

    def _on_segments(self, space: int, fn) -> None:
        for root, off, _ in self._flat_segments(space):
            fn(self._spaces[root], off)

    def _flat_segments(self, space: int, offset: int = 0):
        """(root space, offset, size) pieces of a possibly concatenated space."""
        segs = self._spaces[space].segments
        if not segs:
            return [(self.root(space), offset, self._spaces[space].size)]
        out = []
        for seg, off, _ in segs:
            out += self._flat_segments(seg, offset + off)
        return out

    # -------------------------------------------------------------- queries
    def module(self, name: str) -> nn.Module:
        """The traced module ``name`` (a graph rebuilt by :meth:`from_state_dict` has none)."""
        return self._modules[name]

    def default_layers(self, min_channels: int = 4, linear: bool = False) -> List[str]:
        """Every Conv2d with at least ``min_channels`` outputs, the model's output layer excluded;
        with ``linear``, also every nn.Linear acting on channels-last maps ([N, H, W, C], e.g.
        ConvNeXt's MLPs), whose outputs are channels like a 1x1 conv's."""
        return [n for n, l in self.layers.items()
                if l.out_channels >= min_channels and not l.is_output and
                (l.kind == "conv" or (linear and l.kind == "linear" and len(l.output_shape) >= 3))]

    def coupled(self, layer: str) -> List[str]:
        """Layers whose output channels are tied to ``layer``'s channel for channel (residual adds,
        element-wise products, depthwise convs), ``layer`` included, in execution order."""
        r = self.root(self.layers[layer].space)
        return [n for n, l in self.layers.items() if self.root(l.space) == r]

    def consumers(self, layer: str) -> List[Tuple[str, int, int]]:
        """Layers reading ``layer``'s output channels: (name, offset of the channels in the
        consumer's input, features per channel). Depthwise convs count as consumers too."""
        r = self.root(self.layers[layer].space)
        out = []
        for name, l in self.layers.items():
            if l.input_space is None:
                continue
            for seg, off, _ in self._flat_segments(l.input_space):
                if seg == r:
                    out.append((name, off - l.input_offset, l.input_expand))
        return out

    def producers(self, layer: str) -> List[Tuple[str, int]]:
        """Layers whose output channels make up ``layer``'s input: (name, offset of their channels
        in the input). Several producers at one offset are coupled (residual sums)."""
        l = self.layers[layer]
        if l.input_space is None:
            return []
        out = []
        for seg, off, _ in self._flat_segments(l.input_space):
            for name, p in self.layers.items():
                if self.root(p.space) == seg and not (p.depthwise and p.order >= l.order):
                    out.append((name, off - l.input_offset))
        return out

    # -------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """The graph as plain dicts, lists, tuples and scalars (no module references), for saving
        with ``torch.save`` and loading with ``weights_only=True``."""
        return {
            "layers": [dataclasses.asdict(l) for l in self.layers.values()],
            "spaces": [dataclasses.asdict(s) for s in self._spaces],
            "parent": list(self._parent),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "ModelGraph":
        """Rebuild a graph saved by :meth:`state_dict`; it has no modules (``module()`` fails)."""
        g = cls()
        for d in state["layers"]:
            node = LayerNode(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
            g.layers[node.name] = node
        g._spaces = [_Space(s["size"], None if s["segments"] is None else
                            [tuple(seg) for seg in s["segments"]], bool(s["opaque"]),
                            [tuple(b) for b in s.get("bns", [])], list(s.get("norms", [])))
                     for s in state["spaces"]]
        g._parent = [int(p) for p in state["parent"]]
        return g


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.g = ModelGraph()
        self.names = {m: n for n, m in model.named_modules()}
        self.g._modules = {n: m for m, n in self.names.items()}
        self.stack: List[nn.Module] = []
        self.calls: Dict[nn.Module, int] = {}
        self.state: Dict[int, _State] = {}
        self.keep: List[Tensor] = []  # hold traced tensors so that their ids stay unique
        self.hooks = []

    def __enter__(self):
        def pre(mod, args):
            self.stack.append(mod)

        def post(mod, args, out):
            self.stack.pop()
            self.calls[mod] = self.calls.get(mod, 0) + 1

        self.hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                      nn.modules.module.register_module_forward_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)

    def _get(self, t) -> Optional[_State]:
        return self.state.get(id(t)) if isinstance(t, Tensor) else None

    def _set(self, t, st: Optional[_State]):
        if isinstance(t, Tensor):
            self.keep.append(t)
            if st is None:
                self.state.pop(id(t), None)
            else:
                self.state[id(t)] = st

    def _module(self, cls):
        return self.stack[-1] if self.stack and isinstance(self.stack[-1], cls) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except ValueError:
            raise
        except Exception as e:  # a tracer bug must not hide behind a wrong graph
            raise RuntimeError(f"chanaxis_fast.trace_model: failed to follow {func}: {e}") from e
        return out

    # -------------------------------------------------------------- propagation rules
    def _record(self, func, args, kwargs, out):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if isinstance(args[0] if args else None, (list, tuple)):
            tensors += [a for a in args[0] if isinstance(a, Tensor)]
        inputs = [(t, self._get(t)) for t in tensors]
        known = [(t, s) for t, s in inputs if s is not None]
        if func in _CONV or func in _LINEAR:
            self._layer(func, args, out)
        elif not isinstance(out, Tensor):
            if isinstance(out, (list, tuple)):  # split, chunk, unbind, ...: not modelled
                for _, s in known:
                    if s.space is not None:
                        self.g._mark_opaque(s.space)
            return
        elif not known:
            return
        elif func in _BATCH_NORM:
            self._batch_norm(args[0], out)
        elif func in _ACTIVATIONS:
            self._activation(args[0], out)
        elif func in _NORMS or func in _KEEP:
            s = self._get(args[0])
            if func in _NORMS and s is not None and s.space is not None and self._mixes(func, args, kwargs, s):
                mod = self.stack[-1] if self.stack else None
                name = self.names.get(mod, "<functional>") if mod is not None else "<functional>"
                self.g._on_segments(s.space, lambda sp, off: sp.norms.append(name)
                                    if name not in sp.norms else None)
            self._set(out, dataclasses.replace(s, source=None) if s else None)
        elif func in _BINARY:
            self._binary(inputs, out)
        elif func in _CAT:
            self._cat(args, kwargs, out)
        elif func in _RESHAPE:
            self._reshape(args[0], out)
        elif func in _PERMUTE or func in _TRANSPOSE:
            self._permute(func, args, kwargs, out)
        elif func in _REDUCE:
            self._reduce(args, kwargs, out)
        else:
            self._opaque(known, out)

    @staticmethod
    def _mixes(func, args, kwargs, s) -> bool:
        """Whether a normalisation involves the channel axis (a LayerNorm over the last dims only
        does when the channels are among them)."""
        if func is not F.layer_norm:
            return True
        x = args[0]
        shape = kwargs.get("normalized_shape", args[1] if len(args) > 1 else ())
        n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        return s.cdim % x.dim() >= x.dim() - n

    def _opaque(self, known, out):
        for _, s in known:
            if s.space is not None:
                self.g._mark_opaque(s.space)
        self._set(out, None)

    def _layer(self, func, args, out):
        x = args[0]
        cls = nn.Conv2d if func in _CONV else nn.Linear
        mod = self._module(cls)
        s_in = self._get(x)
        if mod is None:  # a functional conv / linear outside a module of that type
            self._opaque([(x, s_in)] if s_in else [], out)
            return
        name = self.names[mod]
        if name in self.g.layers:
            raise ValueError(f"layer {name!r} is called more than once in a forward pass; "
                             "shared layers are not supported")
        conv = cls is nn.Conv2d
        cdim = 1 if conv else out.dim() - 1
        node = LayerNode(
            name=name, kind="conv" if conv else "linear", order=len(self.g.layers),
            in_channels=mod.in_channels if conv else mod.in_features,
            out_channels=mod.out_channels if conv else mod.out_features,
            groups=mod.groups if conv else 1,
            kernel_size=tuple(mod.kernel_size) if conv else (),
            stride=tuple(mod.stride) if conv else (), padding=tuple(mod.padding) if conv and
            not isinstance(mod.padding, str) else (), dilation=tuple(mod.dilation) if conv else (),
            input_shape=tuple(x.shape[1:]), output_shape=tuple(out.shape[1:]), channel_dim=cdim)
        in_cdim = 1 if conv else x.dim() - 1
        if s_in is not None and s_in.space is not None and s_in.cdim % x.dim() == in_cdim:
            node.input_space, node.input_expand = s_in.space, s_in.expand
        elif s_in is not None and s_in.space is not None:
            self.g._mark_opaque(s_in.space)
        if node.depthwise and node.input_space is not None and s_in.expand == 1:
            node.space = node.input_space  # depthwise: output channel c is input channel c
        else:
            node.space = self.g._new_space(node.out_channels)
        self.g.layers[name] = node
        self._set(out, _State(node.space, cdim, source=(name, "pre_bn")))

    def _batch_norm(self, x, out):
        s = self._get(x)
        mod = self._module(nn.modules.batchnorm._BatchNorm)
        if mod is not None and s.space is not None and s.cdim % x.dim() == 1:
            name = self.names[mod]
            self.g._on_segments(s.space, lambda sp, off: sp.bns.append((name, off))
                                if (name, off) not in sp.bns else None)
        src = None
        if s.source and s.source[1] == "pre_bn" and mod is not None:
            layer = self.g.layers[s.source[0]]
            if layer.bn is None:
                layer.bn, layer.bn_call = self.names[mod], self.calls.get(mod, 0)
                src = (layer.name, "post_bn")
        self._set(out, dataclasses.replace(s, source=src))

    def _activation(self, x, out):
        s = self._get(x)
        mod = self._module(_ACTIVATION_MODULES)
        src = None
        if s.source and s.source[1] in ("pre_bn", "post_bn") and mod is not None:
            layer = self.g.layers[s.source[0]]
            if layer.act is None:
                layer.act, layer.act_call = self.names[mod], self.calls.get(mod, 0)
                src = (layer.name, "post_act")
        self._set(out, dataclasses.replace(s, source=src))

    def _binary(self, inputs, out):
        # Element-wise between tensors: channel c meets channel c, so the spaces are coupled.
        # The first operand's read-out source survives (out = bn2(conv2(x)); out += identity).
        known = [s for t, s in inputs if s is not None and s.space is not None and t.numel() > 1]
        if not known:
            self._set(out, None)
            return
        first = known[0]
        if any(s.cdim % out.dim() != first.cdim % out.dim() or s.expand != first.expand for s in known):
            self._opaque([(None, s) for s in known], out)
            return
        space = first.space
        for s in known[1:]:
            space = self.g._union(space, s.space)
        src = inputs[0][1].source if inputs[0][1] is not None else None
        self._set(out, _State(space, first.cdim, first.expand, src))

    def _cat(self, args, kwargs, out):
        tensors = list(args[0])
        nd = out.dim()
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % nd
        states = [self._get(t) for t in tensors]
        known = [(t, s) for t, s in zip(tensors, states) if s is not None]
        if (len(known) < len(tensors) or any(s.space is None or s.expand != 1 for _, s in known)
                or len({s.cdim % nd for s in states}) > 1):
            self._opaque(known, out)
        elif dim != states[0].cdim % nd:  # along another axis: channels stay aligned
            self._binary(known, out)
        else:
            segs, off = [], 0
            for t, s in known:
                segs.append((s.space, off, t.shape[dim]))
                off += t.shape[dim]
            self._set(out, _State(self.g._new_space(off, segs), dim))

    def _reshape(self, x, out):
        s = self._get(x)
        nd = x.dim()
        cd = s.cdim % nd
        same_batch = out.dim() >= 2 and out.shape[0] == x.shape[0]
        if tuple(out.shape) == tuple(x.shape):
            self._set(out, dataclasses.replace(s, source=None))
        elif cd == nd - 1 and same_batch and out.shape[-1] == x.shape[cd]:
            self._set(out, _State(s.space, out.dim() - 1, s.expand))  # [N, H, W, C] -> [N, HW, C]
        elif cd == 1 and same_batch and tuple(out.shape[:2]) == tuple(x.shape[:2]):
            self._set(out, _State(s.space, 1, s.expand))  # [N, C, H, W] -> [N, C, HW]
        elif cd == 1 and same_batch and out.dim() == 2 and nd > 2:
            self._set(out, _State(s.space, 1, s.expand * x[0, 0].numel()))  # flatten(1)
        else:
            self._opaque([(x, s)], out)

    def _permute(self, func, args, kwargs, out):
        x, s = args[0], self._get(args[0])
        nd = x.dim()
        if func in _PERMUTE:
            dims = kwargs.get("dims")
            if dims is None:
                rest = args[1:]
                dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            perm = [d % nd for d in dims]
        else:
            d0 = kwargs.get("dim0", args[1] if len(args) > 1 else None) % nd
            d1 = kwargs.get("dim1", args[2] if len(args) > 2 else None) % nd
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        if perm[0] != 0 or s.expand != 1:
            self._opaque([(x, s)], out)
        else:
            self._set(out, _State(s.space, perm.index(s.cdim % nd), 1, None))

    def _reduce(self, args, kwargs, out):
        x, s = args[0], self._get(args[0])
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        cd = s.cdim % x.dim()
        dims = None if dims is None else [d % x.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if dims is None or cd in dims or 0 in dims:
            self._opaque([(x, s)], out)
        else:
            self._set(out, _State(s.space, cd if keep else cd - sum(d < cd for d in dims), s.expand))


def trace_model(model: nn.Module, example_input) -> ModelGraph:
    """Trace ``model`` on ``example_input`` (a tensor or a tuple of positional arguments).

    The model runs once in eval mode under ``torch.no_grad()`` (its mode is restored afterwards).
    A small batch (one or two samples) is enough. Raises ``ValueError`` for a model that calls the
    same Conv2d/Linear module twice in one forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_model: model must be an nn.Module, got {type(model).__name__}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = model.training
    model.eval()
    tracer = _Tracer(model)
    try:
        with torch.no_grad(), tracer:
            for a in args:
                if isinstance(a, Tensor):
                    tracer._set(a, None)
            out = model(*args)
    finally:
        model.train(was_training)
    g = tracer.g
    outs = out if isinstance(out, (list, tuple)) else [out]
    for o in outs:
        s = tracer._get(o)
        if s is not None and s.space is not None:
            for name, l in g.layers.items():
                if g.root(l.space) == g.root(s.space):
                    l.is_output = True
    return g
