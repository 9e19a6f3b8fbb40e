"""LoRA through PEFT: low-rank adapters on linear layers. On a quantized base this is QLoRA.

Saved in PEFT's own format, so plain ``peft.PeftModel.from_pretrained(base, directory)`` loads it.
The base is not prepared with ``prepare_model_for_kbit_training``: its fp32 upcast of the frozen
modules is what makes the common QLoRA recipe use more memory than bf16 LoRA.

LoRA's variants are options (docs/strategies.md, "LoRA's variants"): DoRA (``use_dora``), rsLoRA
(``use_rslora``), LoRA+ (``lora_plus_ratio``, through `adapters.GroupsParameters`) and PEFT's
initialisations (``init``). EVA and CorDA compute theirs from the run's first training batches
(`adapters.InitialisesFromData`); LoftQ needs CUDA (`adapters.RefusesRuns`). PiSSA, OLoRA, CorDA and
LoftQ rewrite the base's weights, so their saves hold the plain LoRA of twice the rank that PEFT
converts them to, which fits the original base.
"""
from __future__ import annotations

import math
import re
import shutil
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import adapters

INITS = ("default", "gaussian", "pissa", "olora", "eva", "corda", "loftq")  # and pissa_niter_N, N iterations
# Initialisations that rewrite the base's weights (a residual, a quantized copy) to start from another point.
CHANGES_BASE = ("pissa", "olora", "corda", "loftq")
DATA_BATCHES = 4  # training batches EVA and CorDA initialise from
INITIAL = "_adapters_initial_adapter"  # where a model keeps the directory of its adapter as initialised


@dataclass
class LoraOptions:
    r: int = 16  # rank of each adapter
    alpha: int = 32  # scale: updates are multiplied by alpha / r
    # 0, as unsloth does: PEFT's dropout keeps a dropped copy of each adapter's input for backward (seven a Llama
    # layer), and on the built-in instruction data dropout 0.05 bought no held-out loss for that memory
    # (benchmarks/dropout.py, benchmarks/results/dropout-cpu-2core.json).
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # "all-linear", or module names such as q_proj,v_proj
    use_dora: bool = False  # DoRA: a trained magnitude per output, the adapter setting only the direction
    use_rslora: bool = False  # rsLoRA: updates scaled by alpha / sqrt(r), not alpha / r
    # PEFT's init_lora_weights: default (A random, B zero), gaussian, pissa or pissa_niter_N (the principal singular
    # vectors, by a full or an N-iteration randomized SVD), olora (QR), eva or corda (from the run's data), loftq
    init: str = "default"
    lora_plus_ratio: float = 1.0  # LoRA+: the B matrices learn at this many times the learning rate (16 in its paper)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be at least 1, not {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, not {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:  # also false for NaN
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.init not in INITS and not re.fullmatch(r"pissa_niter_[1-9][0-9]*", self.init):
            raise ValueError(f"init must be one of {', '.join(INITS)} or pissa_niter_N (N iterations, e.g. "
                             f"pissa_niter_4), not {self.init!r}; e.g. --set init=pissa")
        if not (math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0):
            raise ValueError(f"lora_plus_ratio must be a positive number (1: plain LoRA), not {self.lora_plus_ratio}; "
                             "e.g. --set lora_plus_ratio=16")
        if self.use_dora and changes_base(self.init):
            raise ValueError(f"use_dora=true cannot be combined with init={self.init}: DoRA's magnitudes would be "
                             "norms of the rewritten base's weights, so the save could not become a LoRA of the "
                             "original base. Drop --set use_dora=true, or use init=default")


def changes_base(init: str) -> bool:
    """Whether PEFT's initialisation ``init`` rewrites the base's own weights (`CHANGES_BASE`)."""
    return init.startswith(CHANGES_BASE)


def peft_init(init: str) -> bool | str:
    """The option ``init`` as PEFT's ``init_lora_weights``."""
    return True if init == "default" else init


class Lora(adapters.PeftStrategy):
    name = "lora"
    description = "PEFT LoRA: low-rank adapters on linear layers"
    config_class = LoraOptions
    supported_quantization = frozenset(adapters.QUANTIZATIONS)
    supported_tasks = frozenset(adapters.TASKS)
    default_learning_rate = 2e-4
    peft_types = frozenset({"LORA"})  # adapters import reads plain PEFT's LoRA directories

    def peft_config(self, model, config: LoraOptions, loading: bool = False, init: bool | str | None = None):
        """PEFT's LoraConfig. Loading a run whose initialisation rewrote the base, it is that of the saved plain LoRA
        of twice the rank (PEFT's conversion, `save`). ``init`` overrides the option's initialisation: CorDA's
        needs what `apply_with_data` computes first, so plain ``apply`` gives it LoRA's default."""
        from peft import EvaConfig, LoftQConfig, LoraConfig
        from peft.tuners.lora.config import CordaConfig

        targets = adapters.match_targets(model, config.target_modules)
        # GPT-2 style Conv1D layers store their weight transposed.
        transposed = any(type(m).__name__ == "Conv1D" for _, m in adapters.targeted_linears(model, targets))
        r, alpha = config.r, config.alpha
        if loading and changes_base(config.init):  # as PEFT's save_pretrained writes the converted adapter
            r, alpha = 2 * r, alpha * math.sqrt(2) if config.use_rslora else 2 * alpha
        if init is None:
            init = True if loading or config.init == "corda" else peft_init(config.init)
        extra = {"eva": {"eva_config": EvaConfig(rho=1.0)},  # rho 1: every layer keeps rank r
                 "corda": {"corda_config": CordaConfig()},
                 "loftq": {"loftq_config": LoftQConfig(loftq_bits=4)}}.get(init, {})
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=config.dropout, target_modules=targets,
                          fan_in_fan_out=transposed, task_type=adapters.peft_task_type(model),
                          use_dora=config.use_dora, use_rslora=config.use_rslora, init_lora_weights=init, **extra)

    def apply(self, model, config: LoraOptions):
        return _keep_initial(super().apply(model, config), config)

    def data_batches(self, config: LoraOptions) -> int:
        """EVA and CorDA initialise from the run's first `DATA_BATCHES` training batches."""
        return DATA_BATCHES if config.init in ("eva", "corda") else 0

    def apply_with_data(self, model, config: LoraOptions, batches):
        """EVA: LoRA applied, then A set from the SVD of each layer's inputs on ``batches`` (PEFT's
        ``initialize_lora_eva_weights``). CorDA: each layer's input covariance on ``batches`` first (PEFT's
        ``preprocess_corda``), then LoRA applied from the weights' decomposition it orients."""
        import torch
        from peft import initialize_lora_eva_weights
        from peft.tuners.lora.corda import preprocess_corda

        def forward(module, batch):  # the labels only mask EVA's tokens: no loss over the whole logits
            return module(**{k: v for k, v in batch.items() if k != "labels"})

        if config.init == "eva":
            with warnings.catch_warnings():  # PEFT's advice on low_cpu_mem_usage, which adapters does not pass
                warnings.filterwarnings("ignore", message=".*eva initialization.*", category=UserWarning)
                applied = self.apply(model, config)
            initialize_lora_eva_weights(applied, batches, forward_fn=forward, gather_distributed_inputs=False,
                                        show_progress_bar=False)
            return applied
        peft_config = self.peft_config(model, config, init="corda")

        @torch.no_grad()
        def run_model():  # a row at a time: PEFT's hooks take each layer's input as one [tokens, width] matrix
            for batch in batches:
                for row in range(len(batch["input_ids"])):
                    forward(model, {k: v[row:row + 1] for k, v in batch.items()})

        preprocess_corda(model, peft_config, run_model=run_model)
        return _keep_initial(self.apply_config(model, peft_config), config)

    def refuses_run(self, config: LoraOptions, run: adapters.RunShape) -> str | None:
        """LoftQ only on CUDA and an unquantized base; the rewriting initialisations not on a quantized base; EVA
        and CorDA not under sharding."""
        if config.init == "loftq" and run.device != "cuda":
            return (f"init=loftq quantizes the base through bitsandbytes' CUDA kernels (PEFT's LoftQ), which a run on "
                    f"{run.device!r} does not have. Train it on a CUDA GPU, or use --set init=pissa")
        if changes_base(config.init) and run.quantization != "none":
            own = " (LoftQ makes its own 4-bit copy)" if config.init == "loftq" else ""
            return (f"init={config.init} rewrites the base's weights, which a {run.quantization}-quantized base would "
                    f"round again, so its save could not become a LoRA of the original base{own}. Use --quantization "
                    "none, or --set init=default")
        if self.data_batches(config) and run.sharding != "none":
            return (f"init={config.init} initialises from the run's batches in one process, before the weights are "
                    "sharded. Drop --sharding fsdp, or use --set init=default")
        return None

    def parameter_groups(self, model, config: LoraOptions, learning_rate: float) -> list[dict]:
        """LoRA+: the B matrices at ``lora_plus_ratio`` times the learning rate, everything else at it."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if config.lora_plus_ratio == 1:
            return [{"params": [p for _, p in trainable]}]
        b = [p for n, p in trainable if ".lora_B." in n]
        return [{"params": [p for n, p in trainable if ".lora_B." not in n]},
                {"params": b, "lr": learning_rate * config.lora_plus_ratio}]

    def save(self, model, directory: Path, config: LoraOptions) -> None:
        """PEFT's files. After an initialisation that rewrote the base, the adapter's change since then, as PEFT
        converts it (``path_initial_model_for_weight_conversion``): a plain LoRA of twice the rank, A and the
        initial A side by side, B and minus the initial B, which on the original base gives the trained model."""
        initial = getattr(model, INITIAL, None)
        if initial is None:
            adapters.save_peft(model, directory)
        else:
            model.save_pretrained(directory, safe_serialization=True,
                                  path_initial_model_for_weight_conversion=initial)

    def expected_trainable_parameters(self, model, config: LoraOptions) -> int:
        targets = adapters.match_targets(model, config.target_modules)
        linears = [m for _, m in adapters.targeted_linears(model, targets)]
        count = sum(config.r * sum(adapters.linear_features(m)) for m in linears)
        if config.use_dora:  # a magnitude per output feature
            count += sum(adapters.linear_features(m)[1] for m in linears)
        if adapters.task_of(model) == "sequence-classification":  # PEFT trains a copy of the new head
            count += adapters.head_parameters(model)
        return count

    def estimate_memory(self, model: adapters.ModelShape, config: LoraOptions, run: adapters.RunShape):
        """Fp32 adapters (PEFT keeps them fp32 over a bf16 base) and what they save for backward. DoRA adds a
        magnitude per output and keeps two outputs of each layer's width (its norm of the weight is detached, so
        the weight it materialises lives only in the layer's forward); rsLoRA, LoRA+ and the initialisations cost
        what LoRA does."""
        targets = adapters.match_targets(model.meta_model, config.target_modules)
        trainable = self.expected_trainable_parameters(model.meta_model, config)
        matched = [m for _, m in adapters.targeted_linears(model.meta_model, targets)]
        largest = max([config.r * max(adapters.linear_features(m)) for m in matched], default=0)
        leaves = {t.rsplit(".", 1)[-1] for t in targets}
        per_layer = [lin for lin in model.layer_linears if lin.name in leaves]
        n, autocast = run.tokens, run.autocast  # bf16 autocast: CUDA's default, --mixed-precision bf16 elsewhere
        saved = 0
        if config.dropout > 0:  # each adapter's dropout keeps its mask and its output (cast to bf16 under autocast)
            for lin in per_layer:
                saved += n * lin.in_features * (run.dropout_mask_bytes + (2 if autocast else 4))
        elif autocast:  # each adapter casts its input to fp32, and autocast casts it back: a bf16 copy each
            saved += sum(n * lin.in_features * 2 for lin in per_layer)
        else:  # lora_A keeps the layer's own tensor, once per distinct input the base does not keep already
            inputs = {lin.input_group: lin.in_features for lin in per_layer if not lin.input_kept}
            saved += sum(n * width * 4 for width in inputs.values())
        saved += len(per_layer) * n * config.r * (2 if autocast else 4)  # lora_A's output, kept by lora_B
        if config.use_dora:  # the magnitude's gradient keeps the base's output and the adapter's, each layer's width
            saved += sum(2 * n * lin.out_features * (2 if autocast else 4) for lin in per_layer)
        return adapters.StrategyMemory(trainable, 4 * trainable, 4 * largest, gradient_flow="inputs",
                                       layer_activation_bytes=saved)

    def options_from_peft(self, peft_config: dict) -> LoraOptions:
        """r, lora_alpha, lora_dropout, use_dora, use_rslora and a list of target_modules; fan_in_fan_out follows
        from the base, and an initialisation that leaves the base as it was (gaussian, EVA) is replaced by the
        weights loaded."""
        from peft import LoraConfig

        init = peft_config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "eva"):  # PiSSA, OLoRA, CorDA, LoftQ change the base's weights
            raise adapters.AdaptersError(
                f"adapter_config.json has init_lora_weights={init!r}, an initialisation that changes the base's "
                "own weights, so the adapter fits only that changed base. Convert it to a plain LoRA when saving "
                "(PEFT's path_initial_model_for_weight_conversion), then import it.")
        targets = peft_config.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            raise adapters.AdaptersError(
                f"adapter_config.json has target_modules={targets!r}, a regular expression, which strategy 'lora' "
                "has no option for (it takes module names). Save the adapter with a list of module names.")
        if isinstance(targets, list):  # PEFT saves a set, in no particular order
            peft_config = {**peft_config, "target_modules": sorted(targets)}
        return self.options_from_keys(peft_config, LoraConfig, {"r": "r", "lora_alpha": "alpha",
                                                                "lora_dropout": "dropout",
                                                                "target_modules": "target_modules",
                                                                "use_dora": "use_dora", "use_rslora": "use_rslora"},
                                      derived={"fan_in_fan_out", "init_lora_weights", "eva_config"})

    def merge(self, model, config: LoraOptions):
        """W + (alpha / r) B A into each targeted weight (and a classification head's trained copy into the
        head), through PEFT's ``merge_and_unload``: the base model, unwrapped."""
        return model.merge_and_unload()


def _keep_initial(model, config: LoraOptions):
    """After an initialisation that rewrote the base, ``model``'s adapter as initialised, saved in a temporary
    directory that goes with the model: what `Lora.save` converts from (the rewritten base is not kept)."""
    if changes_base(config.init) and not next(model.parameters()).is_meta:  # a plan's skeleton has no weights
        root = tempfile.mkdtemp(prefix="adapters-initial-")
        weakref.finalize(model, shutil.rmtree, root, ignore_errors=True)
        model.save_pretrained(Path(root) / "initial", safe_serialization=True)
        setattr(model, INITIAL, str(Path(root) / "initial"))
    return model


@adapters.hookimpl
def register_strategies(register):
    register(Lora(), aliases={"qlora": "nf4"})  # QLoRA: LoRA on an nf4-quantized base
