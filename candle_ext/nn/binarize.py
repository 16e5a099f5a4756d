"""binarize_: turn the convolutions of an existing torchvision/timm model into binary ones, in place."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Iterable, Union

from torch import nn

from candle_ext.nn.layers import BinaryConv2d, RSign

# The root module remembers which of its convs binarize_ replaced, so that a saved packed model can rebuild the
# same structure from a freshly built float model (candle_ext.load_packed).
BINARIZED_ATTR = "candle_binarized"

Skip = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _explicit_padding(conv: nn.Conv2d):
    """Integer (ph, pw) equivalent to the conv's padding, or None when zero padding cannot express it."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    # 'same' (stride 1 by PyTorch's rule): symmetric only when the dilated kernel extent is odd.
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            return None
        pads.append(total // 2)
    return tuple(pads)


def binarizable(module: nn.Module) -> bool:
    """A plain nn.Conv2d (not a subclass with its own forward, e.g. timm's Conv2dSame or an already binary conv)
    with groups == 1 (depthwise/grouped convs stay full precision), zero padding and a float weight."""
    return (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and module.groups == 1 and module.padding_mode == "zeros"
            and _explicit_padding(module) is not None and module.weight.is_floating_point())


def _binary_replacement(conv: nn.Conv2d) -> nn.Sequential:
    """RSign (threshold 0) then a BinaryConv2d holding the conv's own weight and bias Parameters: weights tied
    between convs (one Parameter in several modules) stay tied, requires_grad and optimizers holding them
    carry over."""
    weight = conv.weight
    binary = BinaryConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          _explicit_padding(conv), conv.dilation, bias=conv.bias is not None,
                          device="meta", dtype=weight.dtype)  # no storage: its Parameters are the conv's
    for name in ("weight", "bias"):
        value = getattr(conv, name)
        if value is not None and not isinstance(value, nn.Parameter):
            # computed by a wrapper (pruning, weight_norm, parametrizations): its current values, as a Parameter
            value = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        setattr(binary, name, value)
    binary.train(conv.training)
    sign = RSign(conv.in_channels).to(device=weight.device, dtype=weight.dtype)
    return nn.Sequential(OrderedDict(sign=sign, conv=binary)).train(conv.training)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _slots(model: nn.Module) -> dict:
    """id(module) -> every qualified name under which `model` holds it (several when one module is used in
    several places: weight tying)."""
    slots = {}
    for name, module in model.named_modules(remove_duplicate=False):
        slots.setdefault(id(module), []).append(name)
    return slots


def binarize_names_(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Binarize exactly the convs called `names` (qualified module names); used to rebuild a saved model. A conv
    held in several places becomes one binary module in all of them (the weights stay tied)."""
    names = list(names)
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in names:
        if name not in modules:
            raise ValueError(f"names: model has no module called {name!r}")
        if not binarizable(modules[name]):
            raise ValueError(f"names: module {name!r} ({type(modules[name]).__name__}) is not a binarizable "
                             "nn.Conv2d (groups=1, zero padding)")
    slots, done_modules = _slots(model), set()
    for name in names:
        conv = modules[name]
        if id(conv) not in done_modules:
            done_modules.add(id(conv))
            replacement = _binary_replacement(conv)
            for slot in slots[id(conv)]:
                _set_submodule(model, slot, replacement)
    done = set(getattr(model, BINARIZED_ATTR, ())) | set(names)
    setattr(model, BINARIZED_ATTR, tuple(sorted(done)))
    return model


def _skip_predicate(model: nn.Module, skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return lambda name, module: bool(skip(name, module))
    names = [skip] if isinstance(skip, str) else list(skip)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"skip must be a module name, a list of names or a predicate(name, module), got {skip!r}")
    known = {n for n, _ in model.named_modules(remove_duplicate=False)}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"skip names not found in the model: {missing}")
    prefixes = tuple(n + "." for n in names)
    return lambda name, module: name in names or name.startswith(prefixes)


def binarize_(model: nn.Module, skip: Skip = None, *, keep_first: bool = True, keep_last: bool = True
              ) -> nn.Module:
    """Replace, in place, every nn.Conv2d of `model` with groups == 1 by RSign + BinaryConv2d (an
    nn.Sequential(sign=RSign, conv=BinaryConv2d)) holding its weight and bias Parameters, and return `model`
    (a weight a wrapper computes, e.g. torch.nn.utils.prune or weight_norm, is taken as its current values).

    Kept full precision: depthwise/grouped convs, conv subclasses with their own forward, and by default the
    first conv and the last layer (the last nn.Conv2d/nn.Linear), in module registration order, which is the
    execution order in torchvision and timm classifiers (not in models that register an auxiliary head after
    the output layer, e.g. torchvision's segmentation models with aux_loss: name the output layer in `skip`
    there). `skip`: more modules to keep, as a qualified name, a list of names (a name keeps its whole subtree)
    or a predicate(name, module) -> bool. A conv the model holds in several places (weight tying) becomes one
    binary module in all of them, or stays full precision in all of them when any of its names is kept; convs
    that share one weight Parameter keep sharing it. Convs a zero-padded binary conv cannot express
    (padding_mode reflect/replicate/circular, padding='same' with an even dilated kernel extent, a non-float
    weight) stay full precision with a warning naming them. Hooks registered on a replaced conv stay with the
    old module (they do not run); binarize before torch.compile, not after.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    compiled = [n or "the model" for n, m in model.named_modules() if type(m).__name__ == "OptimizedModule"]
    if compiled:
        raise TypeError(f"binarize_ got a torch.compile'd module ({', '.join(compiled)}): binarize the model itself, "
                        "then compile it (a compiled wrapper's names hold '_orig_mod.', which a saved model could not "
                        "rebuild)")
    keep = _skip_predicate(model, skip)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, BinaryConv2d)]
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    kept = set()
    if keep_first and convs:
        kept.add(convs[0])
    if keep_last and layers:
        kept.add(layers[-1][0])
    # A conv held in several places is one module: it stays full precision if any of its names is kept.
    slots = _slots(model)
    wanted = [(n, m) for n, m in layers if not any(s in kept or keep(s, m) for s in slots[id(m)])]
    inexpressible = [n for n, m in wanted if type(m) is nn.Conv2d and m.groups == 1 and not binarizable(m)]
    if inexpressible:
        warnings.warn(f"binarize_ keeps {len(inexpressible)} conv(s) in full precision that a zero-padded binary "
                      f"conv cannot express (padding_mode other than 'zeros', padding='same' with an even dilated "
                      f"kernel extent, or a non-float weight): {', '.join(inexpressible)}", stacklevel=2)
    return binarize_names_(model, [n for n, m in wanted if binarizable(m)])
