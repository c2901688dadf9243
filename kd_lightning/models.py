"""Building teachers and students: tiny models from `transformers` config classes, real ones from
`from_pretrained`, and small torch classifiers for classic KD on tabular data.

Every builder takes the data's `vocab_size` (or `num_features`/`num_classes`) at call time, so model
configs stay independent of the dataset config; `kd_lightning.run.distill` passes them in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kd_lightning.tasks import CausalLM, Classification

Builder = TypeVar("Builder", bound=Callable[..., Any])


def builds(task: str) -> Callable[[Builder], Builder]:
    """Mark a builder with the task its models serve (read by `kd_lightning.run.checks.check_config`,
    which thereby refuses a classifier student on text data before anything is built)."""

    def mark(builder: Builder) -> Builder:
        builder.task = task  # type: ignore[attr-defined]
        return builder

    return mark


@contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Model weights initialised inside are a function of `seed` alone, and the global RNG stream is
    left as it was: building a model never reseeds the run (CPU generator; models are built there)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@builds(CausalLM.name)
def build_causal_lm(
    config: Any,
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    torch_dtype: str | None = None,
    **_: Any,
) -> nn.Module:
    """A randomly initialised causal LM from a `transformers` config object (LlamaConfig,
    MixtralConfig, Qwen2MoeConfig, ...). `vocab_size` and the tokenizer's special ids override the
    config so the model always matches the data."""
    from transformers import AutoModelForCausalLM

    if vocab_size is not None:
        config.vocab_size = int(vocab_size)
    if tokenizer is not None:
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(config, key, value)
    with seeded_init(seed):
        model = AutoModelForCausalLM.from_config(config)
    if torch_dtype is not None:
        model = model.to(getattr(torch, torch_dtype))
    return model


@builds(CausalLM.name)
def from_pretrained(
    pretrained: str,
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    torch_dtype: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(pretrained)`: a hub id or a local directory.

    `vocab_size` is *not* forced onto a pretrained model (its embeddings are what they are); the
    trainer compares vocabularies and fails clearly when they differ. `trust_remote_code` stays
    False unless the user sets it. Extra keyword arguments go to `from_pretrained` (for an MoE,
    e.g. `num_experts_per_tok`)."""
    from transformers import AutoModelForCausalLM

    if not pretrained or pretrained == "???":
        raise ValueError("student/teacher `pretrained=` must name a local directory or hub id")
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    if torch.get_default_device().type == "meta":  # shapes only (parameter counts, strategy=fsdp): no weights read
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
        # from_config's dtype defaults to the config's, as from_pretrained's "auto" does
        extra = {"dtype": dtype} if dtype is not None else {}
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)
    return AutoModelForCausalLM.from_pretrained(
        pretrained,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        revision=revision,
        **kwargs,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a `transformers` causal LM: `<base model>.layers` (Llama, Qwen,
    Mistral, Mixtral, Gemma, Phi-3 ...); a clear error for other layouts."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"student=from_teacher: {type(model).__name__} keeps no `model.layers` list of decoder blocks; "
                         "it works with Llama-style decoders (LlamaForCausalLM, Qwen2, Mistral, Mixtral ...)")
    return layers


def chosen_layers(num_layers: int, layers: list[int] | None, every: int | None) -> list[int]:
    """The teacher layers a `from_teacher` student keeps: `layers` as given, else every `every`-th
    from the first (0, k, 2k, ...) plus the last, so the student starts and ends as the teacher does."""
    if layers is not None:
        chosen = [int(i) for i in layers]
        if not chosen or chosen != sorted(set(chosen)) or chosen[0] < 0 or chosen[-1] >= num_layers:
            raise ValueError(f"student.model.layers={list(layers)}: need increasing layer indices in [0, {num_layers})")
        return chosen
    if every is None or int(every) < 1:
        raise ValueError(f"student.model.every={every!r}: set a positive step, or student.model.layers=[...]")
    return sorted(set(range(0, num_layers, int(every))) | {num_layers - 1})


@builds(CausalLM.name)
def from_teacher(teacher: nn.Module | str, *, layers: list[int] | None = None, every: int | None = None,
                 **_: Any) -> nn.Module:
    """A student cut from a pretrained decoder: a subset of its layers kept, everything else (token
    embeddings, final norm, head) copied, as DistilBERT ("DistilBERT, a distilled version of BERT",
    Sanh et al. 2019) initialises from every second layer of its teacher, and Minitron ("Compact
    Language Models via Pruning and Knowledge Distillation", Muralidharan et al. 2024) prunes depth.

    `teacher` is a built model (never modified: the student is a copy) or a directory/hub id that
    `from_pretrained` loads; `layers` lists the kept layers, else every `every`-th is kept
    (`chosen_layers`). The result is an ordinary model of the teacher's class whose config says the
    new depth, so `save_pretrained`/`from_pretrained` round-trip it."""
    import copy

    if teacher is None:  # teacher=cached has no model node to cut from
        raise ValueError("student=from_teacher needs the teacher's model: with a teacher that has none "
                         "(teacher=cached) name its directory, student.model.teacher=<model directory>")
    model = from_pretrained(teacher) if isinstance(teacher, (str, Path)) else copy.deepcopy(teacher)
    blocks = decoder_layers(model)
    kept = chosen_layers(len(blocks), layers, every)
    blocks_kept = nn.ModuleList([blocks[i] for i in kept])
    for new_index, block in enumerate(blocks_kept):  # the KV cache and per-layer settings index by position
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    base.layers = blocks_kept
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    model.requires_grad_(True)
    return model.train()


class MLPClassifier(nn.Module):
    """A plain multi-layer perceptron: the 'any torch classifier' used with `dataset=digits`."""

    def __init__(self, num_features: int, num_classes: int, hidden_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.num_features = num_features
        self.num_classes = num_classes
        self.hidden_sizes = list(hidden_sizes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, F] -> [B, C]
        return self.net(inputs)


@builds(Classification.name)
def build_mlp(
    hidden_sizes: list[int],
    *,
    num_features: int,
    num_classes: int,
    dropout: float = 0.0,
    seed: int | None = None,
    **_: Any,
) -> MLPClassifier:
    with seeded_init(seed):
        return MLPClassifier(num_features, num_classes, list(hidden_sizes), dropout)


def output_size(model: nn.Module) -> int:
    """Number of output logits (vocabulary size of an LM, classes of a classifier)."""
    if isinstance(model, MLPClassifier):
        return model.num_classes
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    if not hasattr(model, "config") and isinstance(getattr(model, "vocab_size", None), int):
        return int(model.vocab_size)  # a teacher without a model here (served, stored)
    return int(model.config.vocab_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save so that `transformers` loads it back: `save_pretrained` (safetensors) plus the
    tokenizer for causal LMs; safetensors weights plus `mlp_config.json` for MLP classifiers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MLPClassifier):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
        config = {"num_features": model.num_features, "num_classes": model.num_classes, "hidden_sizes": model.hidden_sizes}
        (directory / "mlp_config.json").write_text(json.dumps(config))
        return directory
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_model(directory: str | Path) -> nn.Module:
    """Inverse of `save_model` (safetensors only: no pickle is ever loaded)."""
    directory = Path(directory)
    if (directory / "mlp_config.json").is_file():
        from safetensors.torch import load_file

        config = json.loads((directory / "mlp_config.json").read_text())
        model = MLPClassifier(config["num_features"], config["num_classes"], config["hidden_sizes"])
        if torch.get_default_device().type != "meta":  # on meta: shapes only, no weights read
            model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)
