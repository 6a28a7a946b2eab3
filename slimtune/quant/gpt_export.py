"""slimtune's GPT written as a Hugging Face transformers GPTBigCode model, so that plain
``transformers.AutoModelForCausalLM.from_pretrained`` runs it without slimtune.

This is what `slimtune export` writes for a ``model=gpt method=bitnet`` checkpoint: the BitNet layers packed in
transformers' BitNet format with ``quantization_config.quant_method: bitnet`` (`slimtune.quant.pack`).
`export_gpt` also writes a GPT without BitNet layers, in floating point; the benchmarks compare the two.

Why GPTBigCode (transformers 5.x ``models/gpt_bigcode/modeling_gpt_bigcode.py``). Its layers are the GPT's, under
the same names: ``transformer.wte``/``wpe`` (learned positions, no offset), pre-LayerNorm blocks ``ln_1``/``ln_2``
with eps 1e-5, one fused ``attn.c_attn`` ``nn.Linear``, ``attn.c_proj``, ``mlp.c_fc``/``mlp.c_proj`` with the exact
(erf) GELU of ``activation_function="gelu"``, ``ln_f``, and ``lm_head`` tied to ``wte``. Its attention hands
``head_dim ** -0.5`` to ``scaled_dot_product_attention`` as ``scale``, which is the kernel call the GPT makes
(whose default scale is that value), so the export computes the GPT's logits bit for bit in fp32.

Bit for bit matters for BitNet more than for a float model: every BitNet layer rounds its input to 8-bit codes, so
a difference in the last float digit sometimes moves a value across a rounding boundary, and the changed code then
spreads through the layers above. The natural alternative, OPT (pre-LN, learned positions, GELU, optional biases),
multiplies the queries by the scale *before* the product ``q k^T``; that rounds differently unless
``head_dim ** -0.5`` is a power of two. Measured on tiny random 3-layer GPTs with head_dim 24 or 32, exported to
OPT: 1 of 12 at GPT-2's initialisation and 5 of 12 with five times larger weights disagreed with slimtune by more
than 1e-3 in their logits (up to 0.2); exported to GPTBigCode, all of them agreed exactly. transformers' GPT-2
class does not fit at all: its projections are ``Conv1D`` modules, which the BitNet integration does not convert (it
replaces ``nn.Linear``).

What GPTBigCode costs. Its linear layers and LayerNorms always have a bias, so a GPT without biases gets zero
biases (adding 0.0 is exact). For the BitNet layers these are fp32 vectors beside the packed codes: 9 * n_embd
floats per block against 3 * n_embd**2 packed bytes, i.e. 12 / n_embd more (1.6 % at n_embd 768, 12.5 % at 96).
The fused ``c_attn`` is laid out per head there (head h's queries, keys, values, then head h + 1), where the GPT
has all queries, then all keys, then all values: its output rows are permuted, which is exact for the ternary codes
as for floats because a BitNet layer has one scale per tensor.

BitNet. transformers converts every ``nn.Linear`` not in ``modules_to_not_convert`` (here ``lm_head`` and any layer
the checkpoint kept in high precision through ``bitnet.skip``) into its ``BitLinear``: ternary codes times one
inverse scale per layer, inputs quantized per token to 8 bits, which is `slimtune.quant.bitnet.BitLinear` at
full strength computed in the same order. ``bitnet.input_norm`` exports as transformers' ``use_rms_norm``. The
packed format holds output sizes that are multiples of 4, so ``n_embd`` must be one.

Tokenizer. A character-level vocabulary is written as a ``tokenizers`` WordLevel model over single code points
(slimtune's ids) that decodes by concatenation, so ``AutoTokenizer`` encodes and decodes exactly as slimtune's
`CharTokenizer`; like it, it cannot encode a character the corpus never had (transformers reports a missing
``[UNK]`` token). It adds no special tokens and the config names no BOS, EOS or pad token, so ``generate`` runs
for ``max_new_tokens``. A Hugging Face tokenizer (``slimtune prepare --tokenizer PATH``) is written as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from slimtune.errors import SlimtuneError

__all__ = ["bigcode_config", "bigcode_state_dict", "export_gpt", "transformers_tokenizer"]

_BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_BLOCK_NORMS = ("ln_1", "ln_2")


def _gpt_config(model: nn.Module):
    from slimtune.models.gpt import GPT

    if not isinstance(model, GPT):
        raise SlimtuneError(f"export_gpt needs slimtune's GPT (slimtune.models.gpt.GPT), got {type(model).__name__}; "
                            f"a Hugging Face model exports in its own class")
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise SlimtuneError("this GPT's lm_head is not tied to its token embedding (transformer.wte), as "
                            "GPTBigCode's tie_word_embeddings needs; export a GPT built by slimtune.models.gpt.GPT")
    return model.config


def bigcode_config(gpt_config, dtype: torch.dtype = torch.float32):
    """The ``transformers.GPTBigCodeConfig`` whose model computes what a GPT of ``gpt_config`` computes."""
    from transformers import GPTBigCodeConfig

    c = gpt_config
    return GPTBigCodeConfig(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embd, activation_function="gelu", layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, scale_attn_weights=True,
        multi_query=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=["GPTBigCodeForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )


def _qkv_row_order(n_embd: int, n_head: int) -> torch.Tensor:
    """GPTBigCode's row order of the fused qkv projection, as indices into the GPT's: the GPT's rows are
    ``[q | k | v]``, each ``(n_head, head_dim)``; GPTBigCode views its output as ``(n_head, 3 * head_dim)``."""
    return torch.arange(3 * n_embd).view(3, n_head, n_embd // n_head).transpose(0, 1).reshape(-1)


def _linear(linear: nn.Linear, name: str, row_order: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], bool]:
    """``(tensors, packed)``: the state of GPTBigCode's layer ``name`` (keys relative to it, a bias always), and
    whether it is a packed BitNet layer."""
    from slimtune.quant.bitnet import BitLinear
    from slimtune.quant.pack import export_bitlinear_state

    if isinstance(linear, BitLinear):
        state = export_bitlinear_state(linear, name=name, row_order=row_order)
        state["bias"] = torch.zeros(linear.out_features, dtype=linear.weight.dtype)
        return state, True
    if type(linear) is not nn.Linear:
        raise SlimtuneError(f"GPT layer {name} is a {type(linear).__name__}, which the GPTBigCode export cannot "
                            f"write; only nn.Linear and BitNet layers (method=bitnet) export")
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features, dtype=weight.dtype)
    if row_order is not None:
        weight, bias = weight[row_order], bias[row_order]
    return {"weight": weight.clone(), "bias": bias.clone()}, False


def _layer_norm(norm: nn.LayerNorm) -> dict[str, torch.Tensor]:
    weight = norm.weight.detach()
    bias = norm.bias.detach() if norm.bias is not None else torch.zeros_like(weight)
    return {"weight": weight.clone(), "bias": bias.clone()}


def bigcode_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``(state, packed, kept)``: the GPTBigCodeForCausalLM state dict of a GPT (``lm_head`` left out: it is tied),
    the names of its packed BitNet linears, and those of the linears it keeps in floating point."""
    config = _gpt_config(model)
    t = model.transformer
    state = {"transformer.wte.weight": t.wte.weight.detach().clone(),
             "transformer.wpe.weight": t.wpe.weight.detach().clone()}
    state.update({f"transformer.ln_f.{k}": v for k, v in _layer_norm(t.ln_f).items()})
    packed, kept = [], []
    qkv_order = _qkv_row_order(config.n_embd, config.n_head)
    for i, block in enumerate(t.h):
        for norm in _BLOCK_NORMS:
            state.update({f"transformer.h.{i}.{norm}.{k}": v
                          for k, v in _layer_norm(block.get_submodule(norm)).items()})
        for sub in _BLOCK_LINEARS:
            name = f"transformer.h.{i}.{sub}"
            tensors, is_packed = _linear(block.get_submodule(sub), name,
                                         qkv_order if sub == "attn.c_attn" else None)
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
            (packed if is_packed else kept).append(name)
    return {k: v.contiguous() for k, v in state.items()}, packed, kept


def transformers_tokenizer(tokenizer, max_length: int):
    """A transformers tokenizer equal to slimtune's ``tokenizer`` (`slimtune.data.tokenizer`): its own for a Hugging
    Face one, a WordLevel model over single code points for a character-level one."""
    from slimtune.data.tokenizer import CharTokenizer, HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok
    if not isinstance(tokenizer, CharTokenizer):
        raise SlimtuneError(f"the GPT export writes character-level and Hugging Face tokenizers, not "
                            f"{type(tokenizer).__name__}")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(tokenizer.chars)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one code point each
    backend.decoder = decoders.Fuse()  # join without separators
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=max_length)


def export_gpt(model: nn.Module, tokenizer, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write slimtune's GPT ``model`` (with its slimtune ``tokenizer``) as a transformers GPTBigCode folder:
    config.json, model.safetensors, tokenizer files. BitNet layers are packed and the config gets a
    ``quantization_config`` (``quant_method: bitnet``); a GPT without them is written in floating point. The caller
    checks that BitNet layers are at full strength (`slimtune.methods.bitnet.export_bitnet` does). Returns the
    folder."""
    from safetensors.torch import save_file

    from slimtune.atomic import check_new_folder, write_folder_atomically
    from slimtune.quant.bitnet import BitLinear
    from slimtune.quant.pack import bitnet_quantization_config

    gpt_config = _gpt_config(model)
    state, packed, kept = bigcode_state_dict(model)
    config = bigcode_config(gpt_config, model.transformer.wte.weight.dtype)
    if packed:
        layers = [m for m in model.modules() if isinstance(m, BitLinear)]
        norms = {m.use_rms_norm for m in layers}
        if len(norms) > 1:
            raise SlimtuneError("some BitNet layers of this GPT have an input RMSNorm and some do not; transformers' "
                                "use_rms_norm is one switch for the whole model, so export needs all or none")
        config.quantization_config = bitnet_quantization_config(
            modules_to_not_convert=["lm_head", *(re.escape(n) for n in kept)], use_rms_norm=norms == {True},
            rms_norm_eps=layers[0].rms_norm.eps if norms == {True} else 1e-6)
    hf_tokenizer = transformers_tokenizer(tokenizer, gpt_config.block_size)

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        hf_tokenizer.save_pretrained(folder)

    return write_folder_atomically(check_new_folder(out_dir, overwrite), write, replace=True)
