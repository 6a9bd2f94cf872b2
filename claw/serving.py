"""Sizing Kimi K2.6 on our own GPUs with SGLang, and the launch command for each node.

`plan()` answers "do these GPUs hold the weights plus the KV cache of one full-context
sequence, and how many such sequences at once?"; `claw model plan` prints its answer.
Pure Python on purpose: no Django, no SGLang (the platform only ever talks HTTP to it).
docs/serving.md explains every number here and the source it came from.

Units: GiB (2**30 bytes) throughout. A GPU's memory is the figure it is sold with ("80 GB"),
which is about what nvidia-smi reports in GiB (H100: 81559 MiB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30

# The SGLang release the launch flags were checked against (its server_args argparse
# definitions, see tests/test_model_plan.py); compose.yaml pins the same image.
SGLANG_VERSION = "0.5.21"
PORT = 30000
DIST_INIT_PLACEHOLDER = "HEAD_NODE_IP:50000"  # node 0's address and a free port


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    chunked_prefill_tokens: int  # SGLang's default for this memory class


GPUS = {
    "h100": Gpu("H100", 80, 8192),
    "h200": Gpu("H200", 141, 8192),
    "b200": Gpu("B200", 180, 16384),
}


@dataclass(frozen=True)
class Model:
    """The shape of a DeepSeek-V3-style MoE with MLA attention (Kimi K2's family)."""

    name: str  # what SGLang serves it as (--served-model-name) and Claw asks for
    hf_repo: str
    max_context: int
    layers: int
    dense_layers: int  # the first layers have a dense MLP instead of experts
    hidden: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    experts: int
    shared_experts: int
    expert_intermediate: int
    dense_intermediate: int
    vocab: int
    vision_params: int
    expert_bits: int  # routed experts are group-quantized INT4 (QAT); the rest is BF16
    expert_group: int  # one BF16 scale per group of weights

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    def kv_bytes_per_token(self, kv_cache_dtype: str) -> int:
        # MLA caches one compressed latent plus the rope key per token and layer.
        return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * KV_BYTES[kv_cache_dtype]

    def weights(self) -> dict[str, float]:
        """Bytes of each part of the checkpoint."""
        expert_mlp = 3 * self.hidden * self.expert_intermediate  # gate, up and down
        attention = (
            self.hidden * self.q_lora_rank
            + self.q_lora_rank * self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            + self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            + self.heads * self.v_head_dim * self.hidden
        )
        bf16 = 2
        return {
            "routed experts": self.moe_layers
            * self.experts
            * expert_mlp
            * (self.expert_bits + 16 / self.expert_group)
            / 8,
            "shared experts": self.moe_layers * self.shared_experts * expert_mlp * bf16,
            "dense MLP": self.dense_layers * 3 * self.hidden * self.dense_intermediate * bf16,
            "attention": self.layers * attention * bf16,
            "embeddings + LM head": 2 * self.vocab * self.hidden * bf16,
            "expert router": self.moe_layers * self.experts * self.hidden * bf16,
            "vision encoder": self.vision_params * bf16,
        }


KV_BYTES = {"bf16": 2, "fp8_e4m3": 1}

# https://huggingface.co/moonshotai/Kimi-K2.6 (model card and config.json).
MODELS = {
    "kimi-k2.6": Model(
        name="kimi-k2.6",
        hf_repo="moonshotai/Kimi-K2.6",
        max_context=262144,
        layers=61,
        dense_layers=1,
        hidden=7168,
        heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        experts=384,
        shared_experts=1,
        expert_intermediate=2048,
        dense_intermediate=18432,
        vocab=163840,
        vision_params=400_000_000,
        expert_bits=4,
        expert_group=32,
    ),
}

# SGLang holds this much back for a multimodal model's image encoder (memory_hook.py).
VISION_HEADROOM_GIB = 8.0


def sglang_reserve_gib(gpu: Gpu, *, tp: int, attn_dp: int, deepep: bool) -> float:
    """What SGLang keeps out of --mem-fraction-static for activations and CUDA graphs.

    The heuristic of sglang/srt/arg_groups/memory_hook.py (handle_gpu_memory_settings,
    reserve_for_graph_mb) for an MLA model, in MiB, with its default decode graph size.
    """
    max_bs = 512 if tp >= 4 or gpu.memory_gib >= 160 else 256
    mib = 512 + 1.5 * gpu.chunked_prefill_tokens + tp / 8 * 1024
    mib += 2 * max_bs + 1.5 * 1024  # decode graphs; the MLA prefill graph
    if attn_dp > 1:  # DP attention pads every graph batch per DP rank
        mib += max_bs * attn_dp * (4.5 if max_bs > 300 else 3)
    mib = max(mib, 10 * 1024)
    if deepep:
        mib += 2 * 1024  # DeepEP's all-to-all buffers
    return mib / 1024


@dataclass(frozen=True)
class Plan:
    model: Model
    gpu: Gpu
    gpus_per_node: int
    nodes: int
    context: int
    kv_cache_dtype: str
    dp_attention: bool
    deepep: bool
    reserve_gib: float
    mem_fraction_static: float
    static_gib: float  # weights + KV cache pool, per GPU
    weights_gib: dict[str, float]  # per GPU
    kv_pool_gib: float
    sequence_kv_gib: float  # one sequence at the full context
    sequences: int  # full-context sequences served at once, all DP ranks together
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...]  # one launch command per node

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def weights_total_gib(self) -> float:
        return sum(self.weights_gib.values())


def plan(
    *,
    gpu: str,
    gpus_per_node: int,
    nodes: int = 1,
    context: int | None = None,
    model: str = "kimi-k2.6",
    kv_cache_dtype: str = "bf16",
    dp_attention: bool = False,
    deepep: bool = False,
    dist_init_addr: str = DIST_INIT_PLACEHOLDER,
) -> Plan:
    """Size `model` on `nodes` x `gpus_per_node` GPUs: tensor parallel across all of them,
    the routed experts expert-parallel across all of them (SGLang's --ep-size = --tp-size)."""
    spec, card = MODELS[model], GPUS[gpu]
    if gpus_per_node < 1 or nodes < 1:
        raise ValueError("--gpus-per-node and --nodes must be at least 1")
    if context is None:
        context = spec.max_context
    if context < 1:
        raise ValueError("--context must be at least 1 token")
    world = gpus_per_node * nodes
    attn_dp = world if dp_attention else 1  # SGLang's usual choice: --dp-size = --tp-size
    attn_tp = world // attn_dp
    problems = []
    if context > spec.max_context:
        problems.append(f"{spec.name} takes at most {spec.max_context:,} tokens of context.")
    if spec.heads % attn_tp:
        problems.append(
            f"Tensor parallelism {attn_tp} must divide the {spec.heads} attention heads"
            " (use a power-of-two number of GPUs, or --dp-attention)."
        )
    if spec.experts % world:
        problems.append(f"{world} GPUs do not divide the {spec.experts} experts evenly.")

    split = {  # over how many GPUs each part of the checkpoint is spread
        "routed experts": world,
        "shared experts": world,
        "dense MLP": world,
        "attention": attn_tp,
        "embeddings + LM head": attn_tp,
        "expert router": 1,
        "vision encoder": 1,
    }
    weights = {part: b / split[part] / GIB for part, b in spec.weights().items()}
    reserve = sglang_reserve_gib(card, tp=world, attn_dp=attn_dp, deepep=deepep)
    fraction = math.floor((card.memory_gib - reserve - VISION_HEADROOM_GIB) / card.memory_gib * 100)
    fraction = max(fraction, 0) / 100
    static = fraction * card.memory_gib
    weights_total = sum(weights.values())
    kv_pool = static - weights_total
    sequence_kv = spec.kv_bytes_per_token(kv_cache_dtype) * context / GIB
    per_rank = max(math.floor(kv_pool / sequence_kv), 0)
    where = f"{card.name} ({card.memory_gib:g} GiB, {world} GPU{'s' if world > 1 else ''})"
    if kv_pool <= 0:
        problems.append(
            f"The weights need {weights_total:.1f} GiB per {where}, but only {static:.1f} GiB"
            f" is left after SGLang's {reserve:.1f} GiB reserve and {VISION_HEADROOM_GIB:g} GiB"
            f" for the vision encoder: {-kv_pool:.1f} GiB short before any KV cache."
        )
    elif per_rank < 1:
        problems.append(
            f"After {weights_total:.1f} GiB of weights, {kv_pool:.1f} GiB per {where} is left"
            f" for the KV cache; one {context:,}-token sequence needs {sequence_kv:.1f} GiB"
            f" ({kv_cache_dtype})."
        )

    notes = []
    if deepep:
        notes.append(
            "DeepEP: SGLang's Marlin and Triton MoE runners for the native INT4 experts"
            f" register no DeepEP path (SGLang {SGLANG_VERSION}); use it only with a"
            " checkpoint whose MoE runner has one (see docs/serving.md)."
        )
    if nodes > 1:
        notes.append(f"Run each command on its node; node 0 serves the API on port {PORT}.")
        if dist_init_addr == DIST_INIT_PLACEHOLDER:
            notes.append("Replace HEAD_NODE_IP with node 0's address (or pass --dist-init-addr).")
    commands = tuple(
        launch_command(
            spec,
            world=world,
            context=context,
            mem_fraction_static=fraction,
            kv_cache_dtype=kv_cache_dtype,
            dp_attention=dp_attention,
            deepep=deepep,
            nodes=nodes,
            node_rank=rank,
            dist_init_addr=dist_init_addr,
        )
        for rank in range(nodes)
    )
    return Plan(
        model=spec,
        gpu=card,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        context=context,
        kv_cache_dtype=kv_cache_dtype,
        dp_attention=dp_attention,
        deepep=deepep,
        reserve_gib=reserve,
        mem_fraction_static=fraction,
        static_gib=static,
        weights_gib=weights,
        kv_pool_gib=kv_pool,
        sequence_kv_gib=sequence_kv,
        sequences=per_rank * attn_dp,
        problems=tuple(problems),
        notes=tuple(notes),
        commands=commands,
    )


def launch_command(
    spec: Model,
    *,
    world: int,
    context: int,
    mem_fraction_static: float,
    kv_cache_dtype: str = "bf16",
    dp_attention: bool = False,
    deepep: bool = False,
    nodes: int = 1,
    node_rank: int = 0,
    dist_init_addr: str = DIST_INIT_PLACEHOLDER,
) -> tuple[str, ...]:
    """`python3 -m sglang.launch_server …` for one node, in SGLang's canonical flag names."""
    argv = [
        "python3", "-m", "sglang.launch_server",
        "--model-path", spec.hf_repo,
        "--served-model-name", spec.name,
        "--trust-remote-code",
        "--tp-size", str(world),
        "--ep-size", str(world),
        "--tool-call-parser", "kimi_k2",
        "--reasoning-parser", "kimi_k2",
        "--context-length", str(context),
        "--mem-fraction-static", f"{mem_fraction_static:g}",
        "--enable-metrics",  # /metrics, which Claw's backend probe reads
        "--host", "0.0.0.0",  # noqa: S104 - the served API listens on every interface
        "--port", str(PORT),
    ]  # fmt: skip
    if kv_cache_dtype != "bf16":
        argv += ["--kv-cache-dtype", kv_cache_dtype]
    if dp_attention:
        argv += ["--dp-size", str(world), "--enable-dp-attention"]
    if deepep:
        argv += ["--moe-a2a-backend", "deepep"]
    if nodes > 1:
        argv += ["--dist-init-addr", dist_init_addr]
        argv += ["--nnodes", str(nodes), "--node-rank", str(node_rank)]
    return tuple(argv)


def render(plan: Plan) -> str:
    """The plan as text: the per-GPU memory table, the verdict, the command per node."""
    p = plan
    lines = [
        f"{p.model.name} on {p.nodes} x {p.gpus_per_node} {p.gpu.name}"
        f" ({p.world} GPUs, {p.gpu.memory_gib:g} GiB each); context {p.context:,} tokens,"
        f" KV cache {p.kv_cache_dtype}, attention {'data' if p.dp_attention else 'tensor'}"
        " parallel",
        "",
        f"{'per GPU':<52}{'GiB':>8}",
        f"{'GPU memory':<52}{p.gpu.memory_gib:>8.1f}",
        f"{'- SGLang reserve (activations, CUDA graphs)':<52}{p.reserve_gib:>8.1f}",
        f"{'- vision encoder headroom':<52}{VISION_HEADROOM_GIB:>8.1f}",
        f"{f'= weights + KV cache (--mem-fraction-static {p.mem_fraction_static:g})':<52}"
        f"{p.static_gib:>8.1f}",
        f"{'- weights':<52}{p.weights_total_gib:>8.1f}",
        *(f"{'    ' + part:<52}{gib:>8.2f}" for part, gib in p.weights_gib.items()),
        f"{'= KV cache pool':<52}{p.kv_pool_gib:>8.1f}",
        f"{f'one {p.context:,}-token sequence ({p.kv_cache_dtype} KV)':<52}"
        f"{p.sequence_kv_gib:>8.1f}",
        "",
    ]
    if p.fits:
        lines.append(f"Fits: {p.sequences} full-context sequence(s) at once.")
    else:
        lines += ["Does not fit:", *(f"  {problem}" for problem in p.problems)]
        remedy = (
            "  More GPUs (--nodes) or GPUs with more memory make room"
            if p.kv_pool_gib <= 0  # the weights alone do not fit: the KV cache is not the issue
            else "  More GPUs (--nodes), an FP8 KV cache (--kv-cache-dtype fp8_e4m3) or a shorter"
            " --context make room"
        )
        lines.append(f"{remedy}; docs/serving.md has the sizing table.")
    lines += p.notes
    if p.fits:
        for rank, argv in enumerate(p.commands):
            title = f"node {rank}" if p.nodes > 1 else "launch"
            lines += ["", f"# {title}", shell_lines(argv)]
    return "\n".join(lines)


def shell_lines(argv: tuple[str, ...]) -> str:
    """The command as a shell line per flag (with its values), joined by backslashes."""
    lines = [[]]
    for arg in argv:
        if arg.startswith("--"):
            lines.append([])
        lines[-1].append(arg)
    return " \\\n    ".join(" ".join(line) for line in lines)
