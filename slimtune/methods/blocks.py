"""Block discovery for BAdam: split a model's parameters into blocks of name prefixes.

Pure functions over parameter *names* (no torch needed), so they are cheap to test on any naming scheme.

A model with repeated blocks keeps them in a numbered container (`nn.ModuleList`, `nn.Sequential`), which shows in
the parameter names as ``<container>.<index>.<rest>``: ``model.layers.3.mlp.up_proj.weight`` (HF Llama, Qwen,
Gemma), ``transformer.h.3.attn.c_attn.weight`` (GPT-2, slimtune's GPT), ``bert.encoder.layer.3.output.dense.bias``
(BERT). The *outermost* numbered component marks the layer (so MoE experts ``layers.3.mlp.experts.7.`` stay inside
layer 3). Everything registered before the first layer stack is the embedding; everything after the last is the
head (final norm, ``lm_head``, pooler, classifier).

Granularities:

- ``layer``: one block per layer (``model.layers.3.``).
- ``attn_mlp``: each layer split into its attention part and its MLP part; a norm joins the part it feeds
  (``input_layernorm``/``ln_1`` → attention, ``post_attention_layernorm``/``ln_2`` → MLP).
- ``matrix``: one block per module that owns a weight matrix (its bias comes with it); norm-only modules join the
  first matrix block of their part. LoRA adapters (``q_proj.lora_A.default``) count as part of ``q_proj``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from slimtune.errors import SlimtuneError

GRANULARITIES = ("layer", "attn_mlp", "matrix")

# Components that mark the inside of a wrapped module rather than a module of its own (peft's LoRA layers).
_WRAPPER_PARTS = ("base_layer",)


def _names(named_parameters: Iterable) -> list[str]:
    """Accept ``model.named_parameters()``, a list of ``(name, tensor)`` pairs, or plain names."""
    out = []
    for item in named_parameters:
        out.append(item if isinstance(item, str) else item[0])
    return out


def _split_layer(name: str) -> tuple[str, int, list[str]] | None:
    """``'model.layers.3.mlp.w.weight'`` → ``('model.layers', 3, ['mlp', 'w', 'weight'])``; None outside stacks."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i]), int(part), parts[i + 1 :]
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p != "")


def _module_prefix(name: str) -> str:
    """Prefix naming the module that owns a parameter (``'lm_head.'``), or the name itself for root parameters."""
    head, _, _ = name.rpartition(".")
    return head + "." if head else name


def layer_stacks(named_parameters: Iterable) -> dict[str, list[int]]:
    """Numbered containers holding repeated blocks, in registration order, each with its sorted layer indices.

    Containers with at least two indices are stacks; if there is none, single-entry containers count (a
    one-layer model is still a model with a layer list).
    """
    found: dict[str, set[int]] = {}
    for name in _names(named_parameters):
        split = _split_layer(name)
        if split is not None:
            found.setdefault(split[0], set()).add(split[1])
    stacks = {c: sorted(ix) for c, ix in found.items() if len(ix) >= 2}
    if not stacks:
        stacks = {c: sorted(ix) for c, ix in found.items()}
    return stacks


def _is_norm(child: str) -> bool:
    c = child.lower()
    return "norm" in c or c.startswith("ln")


def _role(child: str) -> str:
    """Which half of a transformer layer a direct child module belongs to: ``'attn'`` or ``'mlp'``."""
    c = child.lower()
    if _is_norm(c):
        # A norm belongs to the sub-layer whose input it normalises: pre-attention norms to attention,
        # the second norm (post_attention_layernorm in Llama is the pre-MLP norm, ln_2 in GPT-2) to the MLP.
        mlp_markers = ("post_attention", "post_attn", "ffn", "mlp", "feedforward", "feed_forward")
        return "mlp" if any(m in c for m in mlp_markers) or c.endswith("2") else "attn"
    return "attn" if ("attn" in c or "attention" in c) else "mlp"


def _owner_module(rest: list[str]) -> list[str]:
    """Module path (inside a layer) that owns a parameter, with LoRA/wrapper internals folded into their layer."""
    path = rest[:-1]
    for i, part in enumerate(path):
        if part.startswith("lora_") or part in _WRAPPER_PARTS:
            return path[:i]
    return path


def auto_block_prefixes(
    named_parameters: Iterable,
    granularity: str = "layer",
    include_embedding: bool = False,
    include_lm_head: bool = False,
) -> list[list[str]]:
    """Blocks for any model with a list of repeated layers, each block a list of name prefixes.

    Args:
        named_parameters: ``model.named_parameters()``, ``(name, tensor)`` pairs or names.
        granularity: ``'layer'``, ``'attn_mlp'`` or ``'matrix'`` (see the module docstring).
        include_embedding: add everything registered before the first layer as the first block.
        include_lm_head: add everything registered after the last layer (final norm, lm_head, heads) as the last
            block.

    Returns:
        One list of prefixes per block, in forward order (embedding, layers, head).

    Raises:
        SlimtuneError: unknown granularity, or no numbered layer container in the names.
    """
    if granularity not in GRANULARITIES:
        raise SlimtuneError(f"badam.granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}.")
    names = _names(named_parameters)
    stacks = layer_stacks(names)
    if not stacks:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise SlimtuneError(
            "BlockOptimizer found no repeated layers (a numbered container such as 'model.layers.0.') among the "
            f"parameter names ({shown}); pass block_prefix_list explicitly, e.g. [['encoder.'], ['decoder.']]."
        )

    # Parameters of each layer, in registration order, keyed by (container, index).
    per_layer: dict[tuple[str, int], list[list[str]]] = {}
    before, after, seen_stack = [], [], False
    for name in names:
        split = _split_layer(name)
        if split is not None and split[0] in stacks:
            per_layer.setdefault((split[0], split[1]), []).append(split[2])
            seen_stack = True
        else:
            (after if seen_stack else before).append(name)

    blocks: list[list[str]] = []
    if include_embedding and before:
        blocks.append(_dedupe(_module_prefix(n) for n in before))
    for container, indices in stacks.items():
        for index in indices:
            layer = _join(container, str(index)) + "."
            blocks.extend(_split_one_layer(layer, per_layer.get((container, index), []), granularity))
    if include_lm_head and after:
        blocks.append(_dedupe(_module_prefix(n) for n in after))
    return blocks


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _split_one_layer(layer: str, rests: list[list[str]], granularity: str) -> list[list[str]]:
    """Prefix lists for one layer (``layer`` ends with '.'); ``rests`` are the names inside it, split on '.'."""
    if granularity == "layer" or not rests:
        return [[layer]]
    # Group the layer's direct children by role, keeping registration order of first appearance.
    roles: dict[str, list[list[str]]] = {}
    for rest in rests:
        child = rest[0] if len(rest) > 1 else ""
        roles.setdefault(_role(child) if child else "mlp", []).append(rest)
    order = sorted(roles, key=lambda r: 0 if r == "attn" else 1)
    if granularity == "attn_mlp":
        return [_dedupe(_child_prefix(layer, rest) for rest in roles[r]) for r in order]

    # granularity == "matrix": one block per module owning a >=2-D parameter; modules with only 1-D parameters
    # (norms) join the first matrix block of their role. Shapes are unknown here, so a module counts as owning a
    # matrix when it has a parameter named 'weight' and is not a norm (norm weights are 1-D).
    out: list[list[str]] = []
    for r in order:
        modules = _dedupe(".".join(_owner_module(rest)) for rest in roles[r])
        matrix = [m for m in modules if m and not any(_is_norm(part) for part in m.split("."))]
        others = [m for m in modules if m not in matrix]
        role_blocks = [[layer + m + "."] for m in matrix]
        extra = [layer + m + "." if m else layer for m in others]
        if role_blocks:
            role_blocks[0].extend(extra)
        elif extra:
            role_blocks.append(extra)
        out.extend(role_blocks)
    return out


def _child_prefix(layer: str, rest: list[str]) -> str:
    return layer + rest[0] + "." if len(rest) > 1 else layer + rest[0]


def match_prefixes(names: Sequence[str], prefixes: Sequence[str]) -> list[str]:
    """Names that start with any of the prefixes, in the order of ``names``."""
    return [n for n in names if any(n.startswith(p) for p in prefixes)]


def block_display_name(prefixes: Sequence[str]) -> str:
    """A short readable name for a block: its first prefix, with ``+N`` when it has more."""
    if not prefixes:
        return "<empty>"
    return prefixes[0] + (f" (+{len(prefixes) - 1})" if len(prefixes) > 1 else "")


def default_switch_every(n_examples: int, batch_size: int, n_blocks: int) -> int:
    """Steps per block from the BAdam paper's rule ``min(max(n / (B * D), 50), 100)``, rounded.

    Args:
        n_examples: training examples n.
        batch_size: effective batch size B (micro-batch x accumulation x data-parallel ranks), in examples.
        n_blocks: number of blocks D.
    """
    for key, value in (("n_examples", n_examples), ("batch_size", batch_size), ("n_blocks", n_blocks)):
        if value < 1:
            raise SlimtuneError(f"default_switch_every: {key}={value} must be at least 1.")
    return int(round(min(max(n_examples / (batch_size * n_blocks), 50.0), 100.0)))
