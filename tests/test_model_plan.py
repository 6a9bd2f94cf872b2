"""`claw model plan`: does Kimi K2.6 fit on these GPUs, and the SGLang command per node."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from claw.serving import GIB, MODELS, SGLANG_VERSION, plan

ROOT = Path(__file__).resolve().parent.parent
K26 = MODELS["kimi-k2.6"]

# SGLang `launch_server` flags that Claw's commands, compose.yaml and docs/serving.md use,
# with how many values each takes. Read from the argparse definitions in the sglang 0.5.21
# wheel from PyPI (sha256 96c029f75dec99ba…): sglang/srt/arg_groups/fields/model.py,
# parallel.py, serving.py, schedule.py, exec_.py, observability.py and disagg.py, registered by
# arg_utils.add_cli_args_from_dataclass; --reasoning-parser and --tool-call-parser by
# server_args.ServerArgs.add_cli_args (choices from parser/reasoning_parser_names.py and
# function_call/parser_names.py, both listing kimi_k2). Every generated command was parsed
# with that parser, and again with 0.5.23's (which keeps --enable-dp-attention as a
# deprecated spelling of --attn-dp-size).
VERIFIED_FLAGS = {
    "--model-path": 1,
    "--served-model-name": 1,
    "--trust-remote-code": 0,
    "--tp-size": 1,
    "--ep-size": 1,
    "--dp-size": 1,
    "--enable-dp-attention": 0,
    "--moe-a2a-backend": 1,
    "--tool-call-parser": 1,
    "--reasoning-parser": 1,
    "--context-length": 1,
    "--mem-fraction-static": 1,
    "--kv-cache-dtype": 1,
    "--enable-metrics": 0,
    "--host": 1,
    "--port": 1,
    "--dist-init-addr": 1,
    "--nnodes": 1,
    "--node-rank": 1,
    "--disaggregation-mode": 1,
    "--disaggregation-transfer-backend": 1,
    "--disaggregation-ib-device": 1,
}
VERIFIED_CHOICES = {
    "--tool-call-parser": {"kimi_k2"},
    "--reasoning-parser": {"kimi_k2"},
    "--moe-a2a-backend": {"none", "deepep", "mooncake", "nixl"},
    "--kv-cache-dtype": {"auto", "fp8_e4m3", "fp8_e5m2", "bf16"},
    "--disaggregation-mode": {"null", "prefill", "decode"},
    "--disaggregation-transfer-backend": {"mooncake", "nixl"},
}
# Gone from SGLang (0.5.21 registers neither): --ep-size and --moe-a2a-backend deepep.
REMOVED_FLAGS = {"--enable-ep-moe", "--enable-deepep-moe"}


def parse_flags(argv) -> dict[str, list[str]]:
    """Flag -> its values, checking each flag against VERIFIED_FLAGS and its arity."""
    assert list(argv[:3]) == ["python3", "-m", "sglang.launch_server"]
    flags: dict[str, list[str]] = {}
    rest = list(argv[3:])
    while rest:
        flag = rest.pop(0)
        assert flag in VERIFIED_FLAGS, f"{flag} was not verified against SGLang"
        assert flag not in flags, f"{flag} given twice"
        values = [rest.pop(0) for _ in range(VERIFIED_FLAGS[flag])]
        assert not any(v.startswith("--") for v in values), f"{flag} is missing its value"
        flags[flag] = values
        if flag in VERIFIED_CHOICES:
            assert set(values) <= VERIFIED_CHOICES[flag], (flag, values)
    return flags


@pytest.mark.parametrize(
    ("gpu", "per_node", "nodes", "options", "fits"),
    [
        ("h200", 8, 1, {}, True),
        ("b200", 8, 1, {}, True),
        ("h100", 8, 1, {}, False),
        ("h100", 8, 1, {"context": 32768}, False),  # the weights alone do not fit
        ("h100", 8, 2, {}, True),
        ("h100", 8, 4, {}, True),
        ("h200", 4, 1, {}, False),
        ("h100", 8, 3, {}, False),  # TP 24 does not divide 64 heads
        ("h200", 8, 1, {"kv_cache_dtype": "fp8_e4m3"}, True),
        ("h200", 8, 1, {"dp_attention": True, "context": 131072}, True),
        ("b200", 8, 1, {"context": 300_000}, False),  # longer than the model's context
    ],
)
def test_it_sizes_a_table_of_topologies(gpu, per_node, nodes, options, fits):
    result = plan(gpu=gpu, gpus_per_node=per_node, nodes=nodes, **options)
    assert result.fits is fits, result.problems
    if fits:
        assert result.sequences >= 1
        assert len(result.commands) == nodes


def test_it_fits_one_h200_node_at_full_context():
    result = plan(gpu="h200", gpus_per_node=8)
    assert result.fits
    assert result.context == K26.max_context == 262144
    assert result.sequences >= 2
    assert result.kv_pool_gib >= result.sequences * result.sequence_kv_gib


def test_it_refuses_one_h100_node_at_full_context():
    result = plan(gpu="h100", gpus_per_node=8)
    assert not result.fits
    assert result.kv_pool_gib < 0
    assert "70.2 GiB per H100" in result.problems[0]
    assert "short" in result.problems[0]


def test_it_refuses_a_kv_cache_too_small_for_one_sequence():
    # Weights fit on 8 H200 with data-parallel attention; one 256K sequence does not.
    result = plan(gpu="h200", gpus_per_node=8, dp_attention=True)
    assert 0 < result.kv_pool_gib < result.sequence_kv_gib
    assert "262,144-token sequence needs" in result.problems[0]


def test_two_h100_nodes_split_the_weights_over_sixteen_gpus():
    one, two = plan(gpu="h100", gpus_per_node=8), plan(gpu="h100", gpus_per_node=8, nodes=2)
    assert two.weights_gib["routed experts"] == pytest.approx(one.weights_gib["routed experts"] / 2)
    assert two.weights_total_gib < one.weights_total_gib / 1.9


def test_the_weights_add_up_to_the_int4_checkpoint():
    weights = K26.weights()
    total = sum(weights.values())
    assert 590e9 < total < 600e9  # Kimi K2 Thinking/K2.5/K2.6 ship ~595 GB
    assert weights["routed experts"] / total > 0.95
    params = sum(w / 2 for part, w in weights.items() if part != "routed experts")
    params += weights["routed experts"] / (4.5 / 8)
    assert 1.0e12 < params < 1.05e12


def test_the_kv_cache_holds_one_mla_latent_per_token_and_layer():
    assert K26.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2
    assert K26.kv_bytes_per_token("fp8_e4m3") == 61 * (512 + 64)
    assert plan(gpu="h200", gpus_per_node=8).sequence_kv_gib == pytest.approx(
        61 * 576 * 2 * 262144 / GIB
    )


def test_an_fp8_kv_cache_serves_more_sequences():
    bf16 = plan(gpu="h200", gpus_per_node=8)
    fp8 = plan(gpu="h200", gpus_per_node=8, kv_cache_dtype="fp8_e4m3")
    assert fp8.sequence_kv_gib == pytest.approx(bf16.sequence_kv_gib / 2)
    assert fp8.sequences > bf16.sequences
    assert parse_flags(fp8.commands[0])["--kv-cache-dtype"] == ["fp8_e4m3"]


def test_data_parallel_attention_replicates_attention_and_multiplies_sequences():
    tp = plan(gpu="b200", gpus_per_node=8)
    dp = plan(gpu="b200", gpus_per_node=8, dp_attention=True)
    assert dp.weights_gib["attention"] == pytest.approx(tp.weights_gib["attention"] * 8)
    assert dp.sequences % 8 == 0 and dp.sequences > 0
    flags = parse_flags(dp.commands[0])
    assert flags["--dp-size"] == ["8"] and flags["--enable-dp-attention"] == []


def test_the_command_uses_only_flags_verified_against_sglang():
    result = plan(gpu="h200", gpus_per_node=8)
    (argv,) = result.commands
    flags = parse_flags(argv)
    assert flags["--model-path"] == ["moonshotai/Kimi-K2.6"]
    assert flags["--served-model-name"] == ["kimi-k2.6"]
    assert flags["--tp-size"] == flags["--ep-size"] == ["8"]
    assert flags["--tool-call-parser"] == flags["--reasoning-parser"] == ["kimi_k2"]
    assert flags["--context-length"] == ["262144"]
    assert float(flags["--mem-fraction-static"][0]) == result.mem_fraction_static
    assert flags["--host"] == ["0.0.0.0"]  # noqa: S104 - a value in SGLang's argv
    assert flags["--port"] == ["30000"]
    assert "--trust-remote-code" in flags and "--enable-metrics" in flags
    assert "--nnodes" not in flags and "--moe-a2a-backend" not in flags


def test_every_option_still_yields_verified_flags_and_never_removed_ones():
    result = plan(
        gpu="h200", gpus_per_node=8, nodes=2, dp_attention=True, deepep=True,
        kv_cache_dtype="fp8_e4m3", context=131072,
    )  # fmt: skip
    for argv in result.commands:
        flags = parse_flags(argv)
        assert not REMOVED_FLAGS & set(argv)
        assert flags["--moe-a2a-backend"] == ["deepep"]
        assert flags["--tp-size"] == flags["--ep-size"] == flags["--dp-size"] == ["16"]
    assert any("DeepEP" in note for note in result.notes)


def test_multi_node_commands_number_the_nodes_and_share_the_head_address():
    result = plan(gpu="h100", gpus_per_node=8, nodes=4, dist_init_addr="10.0.0.1:50000")
    assert len(result.commands) == 4
    flags = [parse_flags(argv) for argv in result.commands]
    assert [f["--node-rank"] for f in flags] == [["0"], ["1"], ["2"], ["3"]]
    assert {f["--nnodes"][0] for f in flags} == {"4"}
    assert {f["--dist-init-addr"][0] for f in flags} == {"10.0.0.1:50000"}
    assert {f["--tp-size"][0] for f in flags} == {"32"}
    # Apart from the node rank (its last argument), every node runs the same command.
    assert {argv[-2] for argv in result.commands} == {"--node-rank"}
    assert len({argv[:-1] for argv in result.commands}) == 1


def test_the_platform_never_imports_sglang():
    pattern = re.compile(r"^\s*(import|from)\s+sglang\b", re.MULTILINE)
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("apps", "claw")
        for path in (ROOT / folder).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_compose_pins_the_sglang_release_the_flags_were_checked_against():
    assert f"lmsysorg/sglang:v{SGLANG_VERSION}" in (ROOT / "compose.yaml").read_text()
    assert f'"sglang=={SGLANG_VERSION}"' in (ROOT / "pyproject.toml").read_text()


def run_cli(*args):
    script = Path(sys.executable).with_name("claw")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "claw.cli"]
    return subprocess.run(
        [*command, "model", "plan", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_the_cli_prints_the_breakdown_and_the_command_when_it_fits():
    result = run_cli("--gpu", "h200", "--gpus-per-node", "8")
    assert result.returncode == 0, result.stderr
    assert "Fits: 2 full-context sequence(s) at once." in result.stdout
    assert "routed experts" in result.stdout and "KV cache pool" in result.stdout
    assert "python3 -m sglang.launch_server \\" in result.stdout
    assert "--tp-size 8 \\" in result.stdout


@pytest.mark.slow
def test_the_cli_refuses_with_the_numbers_and_exit_status_1():
    result = run_cli("--gpu", "h100", "--gpus-per-node", "8", "--context", "262144")
    assert result.returncode == 1
    assert "Does not fit:" in result.stdout
    assert "70.2 GiB per H100" in result.stdout
    assert "sglang.launch_server" not in result.stdout
    assert "does not fit" in result.stderr


@pytest.mark.slow
def test_the_cli_prints_one_command_per_node():
    result = run_cli(
        "--gpu", "h100", "--gpus-per-node", "8", "--nodes", "2", "--dist-init-addr", "h0:5000"
    )
    assert result.returncode == 0, result.stderr
    assert "# node 0" in result.stdout and "# node 1" in result.stdout
    assert result.stdout.count("--dist-init-addr h0:5000") == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ("--gpu", "a100", "--gpus-per-node", "8"),
        ("--gpu", "h200", "--gpus-per-node", "0"),
        ("--gpu", "h200", "--gpus-per-node", "8", "--context", "0"),
    ],
)
def test_the_cli_rejects_bad_usage_with_exit_status_2(args):
    assert run_cli(*args).returncode == 2
