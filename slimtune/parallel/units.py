"""A model cut into units: the contiguous pieces a pipeline's stages are made of.

A unit is a module whose forward takes what the previous unit returned (the first unit takes the model's inputs)
and returns a tensor or a tuple of tensors for the next one; the last unit's output goes to the loss. Units
reference the model's own submodules (no copies), so a stage built from units trains the model's parameters, and
parameters two units share (a tied embedding and output head) stay one tensor while both units are in one process.

Three ways to cut, tried in this order by `cut_units`:

- slimtune's GPT: embedding, one unit per transformer block, final norm + head (logits; the loss is the GPT's).
- Hugging Face Llama-class decoders (`model.model.{embed_tokens, layers, norm, rotary_emb}` + `lm_head`): embedding,
  one unit per decoder layer, norm + head. The attention mask and positions travel with the hidden states from
  unit to unit, and each layer rebuilds its causal mask and rotary embedding from them; the loss is the chunked
  head + cross-entropy of `slimtune.train.loss`, so the (B, T, vocab) logits never exist.
- Any model torch.fx can trace (MLPs, CNNs with skip connections, ViTs): the graph's nodes grouped by the top-level
  child module they call (a function node joins the group before it); a value used by a later unit (a skip
  connection) is handed on by every unit in between.

Other Hugging Face models are refused by name: their batches are dicts of keyword arguments, which fx units do not
take. Adapters a method put inside the layers (LoRA) travel with their layers.

`split_points` choose the units by hand: a unit starts at each named one (a unit name such as "transformer.h.6" for
the language models, a top-level child module for the rest); a model fx cannot trace is then run as its top-level
children one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimtune.errors import SlimtuneError


@dataclass
class Units:
    """A model as a sequence of units, with how a batch feeds the first and how the last one's output is scored."""

    modules: list[nn.Module]
    """Unit i's forward takes unit i-1's output (a tensor or a tuple, unpacked) and returns its own."""
    names: list[str]
    """A short name per unit, for plans ("transformer.h.3", "embedding", "layer2")."""
    inputs: Callable[[Any], tuple[tuple[torch.Tensor, ...], Any]]
    """A batch as the workload yields it -> (the first unit's positional inputs, the target the loss needs)."""
    loss_sum: Callable[[Any, Any], torch.Tensor]
    """(last unit's output, target) -> the sum of the per-target losses (a scalar)."""
    example: Callable[[int, int], Any] | None = None
    """(rows, sequence length) -> a random batch shaped like the workload's, for profiling (language models)."""

    def __len__(self) -> int:
        return len(self.modules)


class Chain(nn.Module):
    """Units run one after the other: what one pipeline stage computes."""

    def __init__(self, units: Sequence[nn.Module]):
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, *args):
        for unit in self.units:
            out = unit(*args)
            args = out if isinstance(out, tuple) else (out,)
        # What a stage sends must be contiguous: torch's receiving side allocates its buffer with the sent strides,
        # and gloo receives only into contiguous memory (an expanded position tensor is not).
        args = tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)
        return args if len(args) > 1 else args[0]


def cut_units(model: nn.Module, split_points: Sequence[str] = ()) -> Units:
    """`model` as units (see the module docstring). Raises SlimtuneError, naming the module, when it cannot be cut."""
    from slimtune.models.gpt import GPT

    if isinstance(model, GPT):
        return merge_at(_gpt_units(model), split_points)
    if _is_llama_class(model):
        return merge_at(_llama_units(model), split_points)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is not None:  # a Hugging Face model of another family: its batches are dicts fx units cannot take
        from slimtune.train.loss import FUSED_LOSS_MODEL_TYPES

        raise SlimtuneError(f"strategy=pipeline cuts Hugging Face causal LMs of the Llama-class families "
                            f"({', '.join(sorted(FUSED_LOSS_MODEL_TYPES))}) and slimtune's GPT; "
                            f"{type(model).__name__} (model_type {model_type!r}) is not one of them: train it with "
                            f"another strategy")
    return fx_units(model, split_points)


def merge_at(units: Units, split_points: Sequence[str]) -> Units:
    """`units` joined so that a unit starts only at the first one and at each unit named in `split_points`."""
    if not split_points:
        return units
    unknown = [p for p in split_points if p not in units.names]
    if unknown:
        raise SlimtuneError(f"pipeline.split_points names {', '.join(map(repr, unknown))}, not a unit of this model; "
                            f"choose from: {', '.join(units.names)}")
    starts = sorted({0, *(units.names.index(p) for p in split_points)})
    ends = starts[1:] + [len(units)]
    return Units(modules=[Chain(units.modules[a:b]) for a, b in zip(starts, ends)],
                 names=[units.names[a] for a in starts], inputs=units.inputs, loss_sum=units.loss_sum,
                 example=units.example)


# ---------------------------------------------------------------------------------------------------------------
# slimtune's GPT
# ---------------------------------------------------------------------------------------------------------------


class _GPTEmbedding(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.wte, self.wpe, self.drop = gpt.transformer.wte, gpt.transformer.wpe, gpt.transformer.drop

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C), as GPT.forward computes it


class _GPTHead(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.ln_f, self.lm_head = gpt.transformer.ln_f, gpt.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


def _gpt_units(gpt) -> Units:
    def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                               reduction="sum")

    def example(rows: int, seq: int):
        ids = torch.randint(0, gpt.config.vocab_size, (rows, seq + 1), device=gpt.lm_head.weight.device)
        return ids[:, :-1], ids[:, 1:]

    blocks = list(gpt.transformer.h)
    return Units(modules=[_GPTEmbedding(gpt), *blocks, _GPTHead(gpt)],
                 names=["embedding", *(f"transformer.h.{i}" for i in range(len(blocks))), "head"],
                 inputs=lambda batch: ((batch[0],), batch[1]), loss_sum=loss_sum, example=example)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Llama-class decoders
# ---------------------------------------------------------------------------------------------------------------


def _is_llama_class(model: nn.Module) -> bool:
    from slimtune.train.loss import fused_head_backbone

    backbone = fused_head_backbone(model)
    return backbone is not None and all(hasattr(backbone, name) for name in
                                        ("embed_tokens", "layers", "norm", "rotary_emb"))


class _HFEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids, attention_mask, position_ids):
        return self.embed_tokens(input_ids), attention_mask, position_ids  # (B, T, C), (B, T), (B, T)


class _HFLayer(nn.Module):
    """One decoder layer; it rebuilds the causal mask and rotary embedding its attention needs."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config):
        super().__init__()
        self.layer, self.rotary_emb = layer, rotary_emb
        self.config = config

    def forward(self, hidden, attention_mask, position_ids):
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        rotary = self.rotary_emb(hidden, position_ids=position_ids)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary,
                         use_cache=False)
        return (out[0] if isinstance(out, tuple) else out), attention_mask, position_ids


class _HFHead(nn.Module):
    """The final norm; the output head's weight is used by the loss (`linear_cross_entropy`), which this unit owns."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden, attention_mask, position_ids):
        return self.norm(hidden)


PAD_TO = 64
"""Hugging Face batches are padded to a multiple of this many tokens: torch's pipeline stages infer their shapes,
and allocate buffers, once per input shape, and ragged fine-tuning batches would otherwise bring a new one at
almost every step."""


def _llama_units(model) -> Units:
    from slimtune.train.loss import IGNORE_INDEX, linear_cross_entropy

    config = model.config
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise SlimtuneError(f"{type(model).__name__} has layers with sliding-window attention, which the pipeline's "
                            f"per-layer units do not rebuild; train it with another strategy")
    backbone = model.model
    head = _HFHead(backbone.norm, model.lm_head)

    def inputs(batch: dict):
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        positions = batch.get("position_ids")
        # Right padding (masked, no targets) up to a multiple of PAD_TO tokens leaves every real token's output and
        # loss as it was, and bounds the shapes the stages see.
        extra = -ids.size(1) % PAD_TO
        ids, mask, labels = F.pad(ids, (0, extra)), F.pad(mask, (0, extra)), F.pad(labels, (0, extra), value=-100)
        if positions is None:  # as the model computes them, one row per sequence so micro-batches split it
            positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        else:
            positions = F.pad(positions, (0, extra))
        return (ids, mask, positions), labels

    def loss_sum(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # HF convention: labels shift inside
        return linear_cross_entropy(hidden.flatten(0, 1), head.lm_head.weight, targets.flatten(), reduction="sum")

    def example(rows: int, seq: int) -> dict:
        ids = torch.randint(0, config.vocab_size, (rows, seq), device=head.lm_head.weight.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    layers = [_HFLayer(layer, backbone.rotary_emb, config) for layer in backbone.layers]
    return Units(modules=[_HFEmbedding(backbone.embed_tokens), *layers, head],
                 names=["embed_tokens", *(f"layers.{i}" for i in range(len(layers))), "norm+lm_head"],
                 inputs=inputs, loss_sum=loss_sum, example=example)


# ---------------------------------------------------------------------------------------------------------------
# Any fx-traceable model
# ---------------------------------------------------------------------------------------------------------------


def fx_units(model: nn.Module, split_points: Sequence[str] = (),
             loss_sum: Callable[[Any, Any], torch.Tensor] | None = None) -> Units:
    """Units of a model torch.fx can trace: one per top-level child module it calls (or starting at each of
    `split_points`). Batches are (inputs, target) pairs; `loss_sum(output, target)` scores the last unit's output
    (default: summed cross-entropy)."""
    import torch.fx

    if loss_sum is None:
        def loss_sum(output, target):
            return F.cross_entropy(output, target, reduction="sum")
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...) for code it cannot follow
        if split_points:
            modules, names = _children_in_order(model, split_points)
        else:
            culprit = _untraceable_module(model)
            raise SlimtuneError(
                f"torch.fx cannot trace {type(model).__name__}{f' (in its module {culprit!r})' if culprit else ''}: "
                f"{str(exc).splitlines()[0]}. Name the top-level modules where stages may start with "
                f"pipeline.split_points=NAME,NAME (its children, which then run one after the other: "
                f"{', '.join(n for n, _ in model.named_children()) or 'none'}), or make that code traceable") from None
    else:
        groups = _group_nodes(graph_module, split_points)
        modules = [_unit_module(graph_module, groups, index) for index in range(len(groups))]
        names = [name for name, _ in groups]
    return Units(modules=modules, names=names, inputs=lambda batch: (tuple(batch[:-1]), batch[-1]),
                 loss_sum=loss_sum)


def _children_in_order(model: nn.Module, split_points: Sequence[str]) -> tuple[list[nn.Module], list[str]]:
    """Units of consecutive top-level children, a new one at each split point: for a model fx cannot trace whose
    forward runs its children one after the other, each on the previous one's output (as nn.Sequential does)."""
    children = list(model.named_children())
    names = [name for name, _ in children]
    unknown = [p for p in split_points if p not in names]
    if unknown:
        raise SlimtuneError(f"pipeline.split_points names {', '.join(map(repr, unknown))}, not a top-level module of "
                            f"{type(model).__name__}; choose from: {', '.join(names)}")
    starts = sorted({0, *(names.index(p) for p in split_points)})
    ends = starts[1:] + [len(children)]
    return ([Chain([module for _, module in children[a:b]]) for a, b in zip(starts, ends)],
            [names[a] for a in starts])


def _untraceable_module(model: nn.Module) -> str | None:
    """The first top-level child that torch.fx cannot trace on its own (the likely culprit), if any."""
    import torch.fx

    for name, child in model.named_children():
        try:
            torch.fx.symbolic_trace(child)
        except Exception:  # as above: any failure marks the child
            return name
    return None


def _group_nodes(graph_module, split_points: Sequence[str]) -> list[tuple[str, list]]:
    """The graph's compute nodes in order, grouped into units."""
    children = [name for name, _ in graph_module.named_children()]
    unknown = [p for p in split_points if p not in children]
    if unknown:
        raise SlimtuneError(f"pipeline.split_points names {', '.join(map(repr, unknown))}, which "
                            f"{'is' if len(unknown) == 1 else 'are'} not a top-level module of the model; choose "
                            f"from: {', '.join(children)}")
    groups: list[tuple[str, list]] = []
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        owner = str(node.target).split(".")[0] if node.op == "call_module" else None
        starts = owner is not None and (owner in split_points if split_points else True)
        if not groups or (starts and owner != groups[-1][0]):
            groups.append((owner or str(node.name), []))
        groups[-1][1].append(node)
    return groups


def _unit_module(graph_module, groups: list[tuple[str, list]], index: int) -> nn.Module:
    """A GraphModule computing group `index`: its inputs are the values earlier groups produced (or the model's
    inputs) that it or any later group uses; its outputs are the values later groups use (handed on unchanged when
    only a later group needs them)."""
    import torch.fx

    graph = graph_module.graph
    position = {node: i for i, node in enumerate(graph.nodes)}
    first = position[groups[index][1][0]]
    last = position[groups[index][1][-1]]

    def live_after(boundary: int) -> list:
        """Values defined at or before `boundary` (a node position) that a node after it uses, in graph order."""
        out = []
        for node in graph.nodes:
            if position[node] <= boundary and any(position[user] > boundary for user in node.users):
                out.append(node)
        return out

    if index == 0:
        incoming = [n for n in graph.nodes if n.op == "placeholder"]
    else:
        incoming = live_after(first - 1)
    outgoing = live_after(last)
    new = torch.fx.Graph()
    env = {}
    for node in incoming:
        env[node] = new.placeholder(node.name)
    for node in groups[index][1]:
        env[node] = new.node_copy(node, lambda n: env[n])
    if index == len(groups) - 1:
        (result,) = [n for n in graph.nodes if n.op == "output"][0].args
        new.output(torch.fx.node.map_arg(result, lambda n: env[n]))
    else:
        values = tuple(env[n] for n in outgoing)
        new.output(values if len(values) > 1 else values[0])
    return torch.fx.GraphModule(graph_module, new)
