"""Model families: the kind of model a run trains, the fourth plug-in axis beside method, strategy and workload.

    GPTFamily           slimtune's own GPT, built from scratch from the gpt.* keys (model=gpt)
    HFCausalLMFamily    a Hugging Face causal LM loaded from its files (any other model, hf.task=lm)
    HFClassifierFamily  a Hugging Face model with a new sequence-classification head (hf.task=classify)

Methods, strategies and the planner ask the run's family what differs between kinds of model (the sequence a run
pads to, what the planner can estimate, the task type LoRA gives peft, whether loading can quantize, how a
checkpoint of the family is recognised) instead of testing `model == "gpt"` or `hf.task` themselves, so that a new
kind of model is one class here (or in a plug-in, see `slimtune.registry`) rather than a branch in each of them.

One family per run: `family_of(cfg)` builds it from the config alone (`slimtune estimate` and the planner have no
data), and the run's workload holds it as `workload.family`. A family names the workload that reads its data
(`workload`, a `slimtune.registry.WORKLOADS` name); `build_workload` builds that one.

Family classes register themselves in `FAMILIES`. `claims(model, cfg)` says whether a config is for the family;
a Hugging Face causal LM is what a config names when no family claims it (`default = True`).
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.registry import FAMILIES


class ModelFamily:
    """Interface of a model family (see the module docstring). Class attributes set by subclasses:

    workload        the `WORKLOADS` name of the workload that trains this family
    checkpoint_kind the "kind" a checkpoint's model_config.json records for this family (None: not recognised)
    logits_fp32     whether the loss computes the logits' cross-entropy in fp32 (the planner counts them)
    loads_pretrained whether the model is loaded from files (a method may then quantize it while loading)
    peft_task_type  the peft `task_type` LoRA gives this family's models
    trainable_heads modules the family creates fresh, which must train and be saved beside an adapter
    default         the family of a config that no family claims (one family: the Hugging Face causal LM)
    """

    workload: str = ""
    checkpoint_kind: str | None = None
    logits_fp32: bool = True
    loads_pretrained: bool = True
    peft_task_type: str | None = None
    trainable_heads: tuple[str, ...] = ()
    default: bool = False

    def __init__(self, cfg, model: str | None = None):
        self.cfg = cfg
        self.model = cfg.model if model is None else model

    @classmethod
    def claims(cls, model: str, cfg) -> bool:
        """Whether `model` (the config's model, or `slimtune estimate --model`) with `cfg` is of this family."""
        return False

    # -- the run's shape ------------------------------------------------------------------------------------------

    def seq_len(self) -> int:
        """The longest sequence a run pads its batches to (the planner's and the pipeline profiler's length)."""
        raise NotImplementedError

    def estimate_seq_len(self) -> int:
        """The sequence `slimtune estimate` assumes when --seq is not given (there is no data to read it from)."""
        return self.seq_len()

    def spec_without_data(self) -> dict:
        """What the model builder needs, as far as the config alone says it (`slimtune split`)."""
        return {}

    def storage_dtype(self):
        """The dtype the weights are stored in, as the planner assumes before loading (unless the method says)."""
        import torch

        return torch.float32

    # -- building and checking the model --------------------------------------------------------------------------

    def build_model(self, spec: dict, load_options: dict):
        """The `slimtune.models.build.BuiltModel` of the run: `spec` is the workload's `model_spec()`,
        `load_options` the method's `load_options()`."""
        raise NotImplementedError

    def resolve(self) -> None:
        """Check that the model's files can be found (a dry run), without loading them."""

    def base_model_path(self) -> str:
        """How an adapter records the base model it was trained on."""
        return str(self.model)

    # -- the planner ----------------------------------------------------------------------------------------------

    def spec_before_loading(self, data_spec: dict):
        """The planner's `ModelSpec` of the model a run will build, from the config and the workload's
        `model_spec()`; raises `NoEstimate` (with the reason) where the planner cannot size the family."""
        from slimtune.plan.settings import NoEstimate

        raise NoEstimate(f"the planner has no estimate for {type(self).__name__} models")

    def run_settings(self, common: dict, model=None):
        """The planner's `RunSettings` from the run-wide `common` ones (batch, dtypes, device, ...), and the live
        model once it exists."""
        from slimtune.plan.settings import RunSettings

        return RunSettings(seq=self.seq_len(), logits_fp32=self.logits_fp32, **common)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @classmethod
    def owns_checkpoint(cls, source: Path) -> bool:
        """Whether the checkpoint folder `source` was written by a run of this family."""
        return checkpoint_family(source) is cls

    @classmethod
    def load_plain(cls, source: Path):
        """(model, tokenizer) of the checkpoint `source` as its plain transformers class, for export; None when
        the method's `load_for_inference` loads it."""
        return None

    @classmethod
    def load_base(cls, model: str, source: Path, **options):
        """The pretrained `model` loaded as the run that wrote the checkpoint `source` loaded it (the base under an
        adapter); `options` go to the loader. A causal LM unless the family has its own head."""
        from slimtune.models.hf import load_causal_lm

        return load_causal_lm(model, **options)[0]


@FAMILIES.register("gpt")
class GPTFamily(ModelFamily):
    """slimtune's GPT: full logits in their own dtype, SDPA attention, fp32 weights, built from scratch."""

    workload = "gpt"
    checkpoint_kind = "gpt"
    logits_fp32 = False
    loads_pretrained = False

    @classmethod
    def claims(cls, model: str, cfg) -> bool:
        return model == "gpt"

    def seq_len(self) -> int:
        return self.cfg.gpt.block_size

    def spec_without_data(self) -> dict:
        from slimtune.parallel.split import cfg_vocab

        return {"vocab_size": cfg_vocab(self.cfg)}

    def build_model(self, spec: dict, load_options: dict):
        from slimtune.models.build import build_gpt

        return build_gpt(self.cfg, spec)

    def base_model_path(self) -> str:
        return "gpt"

    def spec_before_loading(self, data_spec: dict):
        from dataclasses import asdict

        from slimtune.plan.spec import ModelSpec

        return ModelSpec.from_gpt(vocab_size=data_spec["vocab_size"], **asdict(self.cfg.gpt))


class _HFFamily(ModelFamily):
    """A Hugging Face model: padded to dataset.max_seq_len, stored in hf.weights_dtype, loss in fp32 (chunked
    through slimtune's fused head where the model allows it)."""

    def seq_len(self) -> int:
        return self.cfg.dataset.max_seq_len

    def estimate_seq_len(self) -> int:
        return 1024

    def storage_dtype(self):
        from slimtune.models.build import DTYPES

        return DTYPES[self.cfg.hf.weights_dtype]

    def build_model(self, spec: dict, load_options: dict):
        from slimtune.models.build import build_hf

        return build_hf(self.cfg, spec, load_options)

    def resolve(self) -> None:
        from slimtune.models.hf import resolve_model

        resolve_model(self.cfg.model)

    def base_model_path(self) -> str:
        from slimtune.models.hf import resolve_model

        return str(resolve_model(self.cfg.model).resolve())

    def run_settings(self, common: dict, model=None):
        from slimtune.plan.run import _loss_chunk_default
        from slimtune.plan.settings import RunSettings
        from slimtune.train.loss import fused_head_backbone

        attention = "flash"
        chunk = _loss_chunk_default()
        if model is not None:
            implementation = getattr(model.config, "_attn_implementation", None)
            attention = "eager" if implementation == "eager" else "flash"
            chunk = chunk if fused_head_backbone(model) is not None else None
        return RunSettings(seq=self.seq_len(), checkpointing=self.cfg.hf.gradient_checkpointing, attention=attention,
                           loss_chunk=chunk, logits_fp32=self.logits_fp32, **common)


@FAMILIES.register("hf-causal-lm")
class HFCausalLMFamily(_HFFamily):
    workload = "hf-causal-lm"
    checkpoint_kind = "hf-causal-lm"
    peft_task_type = "CAUSAL_LM"
    default = True

    def spec_before_loading(self, data_spec: dict):
        from slimtune.models.hf import resolve_model
        from slimtune.plan.settings import NoEstimate
        from slimtune.plan.spec import ModelSpec

        try:
            return ModelSpec.from_hf_config(resolve_model(self.cfg.model))
        except SlimtuneError as exc:
            raise NoEstimate(str(exc)) from None


@FAMILIES.register("hf-classifier")
class HFClassifierFamily(_HFFamily):
    workload = "hf-classifier"
    checkpoint_kind = "hf-classifier"
    peft_task_type = "SEQ_CLS"
    # The classification heads transformers initialises fresh: they must train and be saved.
    trainable_heads = ("score", "classifier")

    @classmethod
    def claims(cls, model: str, cfg) -> bool:
        return model != "gpt" and cfg.hf.task == "classify"

    def spec_before_loading(self, data_spec: dict):
        from slimtune.plan.settings import NoEstimate

        raise NoEstimate("the planner covers causal language models, not classifiers (hf.task=classify)")

    @classmethod
    def load_base(cls, model: str, source: Path, **options):
        from slimtune.models.hf import load_sequence_classifier
        from slimtune.train import checkpoint as ckpt_io

        labels = ckpt_io.read_model_config(source)["labels"]
        return load_sequence_classifier(model, num_labels=len(labels), label_names=labels, **options)[0]

    @classmethod
    def load_plain(cls, source: Path):
        from transformers import AutoModelForSequenceClassification

        from slimtune.models.hf import load_tokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(source), local_files_only=True)
        return model, load_tokenizer(source)


def family_of(cfg, model: str | None = None) -> ModelFamily:
    """The model family of `cfg` (of `model` instead of cfg.model where given, as `slimtune estimate --model`)."""
    name = cfg.model if model is None else model
    classes = list(FAMILIES.classes().values())
    claimed = [cls for cls in classes if cls.claims(name, cfg)]
    if len(claimed) > 1:
        raise SlimtuneError(f"model={name}: model families {', '.join(c.name for c in claimed)} all claim it; "
                            "register only one of them (their `claims` must not overlap)")
    if not claimed:
        claimed = [cls for cls in classes if cls.default]
    return claimed[0](cfg, model)


def checkpoint_family(source: Path) -> type[ModelFamily] | None:
    """The family whose run wrote the checkpoint folder `source` (from its model_config.json "kind", which
    slimtune's GPT leaves out); None for a folder without one."""
    from slimtune.train import checkpoint as ckpt_io

    source = Path(source)
    if not (source / "model_config.json").is_file():
        return None
    kind = ckpt_io.read_model_config(source).get("kind", "gpt")
    for cls in FAMILIES.classes().values():
        if cls.checkpoint_kind == kind:
            return cls
    return None
