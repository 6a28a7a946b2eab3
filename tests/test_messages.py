"""Error messages name only keys that exist: every `key=` inside a SlimtuneError message is a real config key (or
an argument of the Python function that raises it)."""

import ast
import re
from pathlib import Path

from slimtune.config import TrainConfig, plugin_sections
from slimtune.typed_config import default_values

ROOT = Path(__file__).resolve().parents[1] / "slimtune"

# Messages of Python APIs that name their own keyword arguments (not config keys), by the module that raises them.
API_ARGUMENTS = {
    "optim/block.py": {"start_block", "update_in_backward"},
    "optim/ratio.py": {"include_embedding", "update_ratio"},
    "models/gpt.py": {"block_size", "n_embd", "n_head"},
    "models/hf.py": {"num_labels"},
    "infer.py": {"chat"},
    "parallel/partition.py": {"balance", "memory_cap", "schedule", "virtual_stages"},
    "quant/arith.py": {"bits"},
    "quant/bitnet.py": {"bias"},
    "quant/pack.py": {"linear_class", "out_features", "quantization_mode"},
    "quant/load.py": {"linear_class", "quantization_mode"},  # fields of transformers' quantization_config
    "methods/bitnet.py": {"lam"},  # BitLinear's quantization strength, reported, not set by a key
    "plan/spec.py": {"hidden", "mlp", "n_heads", "n_kv_heads", "norm"},
    "plan/activations.py": {"attention", "backward_from_layer"},
    "cli.py": {"key"},
    "typed_config.py": {"key"},
}
KEY = re.compile(r"(?<![\w.\-/])([a-z_]+(?:\.[a-z_]+)*)=")


def _config_keys() -> set[str]:
    def walk(values: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in values.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k != "column_map":
                out |= walk(v, prefix + k + ".")
        return out

    keys = walk(default_values(TrainConfig))
    for name, cls in plugin_sections().items():
        keys |= walk(default_values(cls), name + ".")
    return keys | {"dataset.column_map." + k for k in ("instruction", "input", "output", "messages", "text")}


def test_every_key_named_in_an_error_message_exists():
    valid = _config_keys()
    wrong = []
    for path in ROOT.rglob("*.py"):
        module = str(path.relative_to(ROOT))
        allowed = API_ARGUMENTS.get(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "SlimtuneError":
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        for key in KEY.findall(const.value):
                            if key not in valid and key not in allowed:
                                wrong.append(f"{module}: {key}=")
    assert not wrong, "messages name keys that do not exist: " + ", ".join(sorted(set(wrong)))
