"""transformers and datasets (the real clients, from the `clients` test extra) with a real
agent as HF_ENDPOINT, the project's mirror behind it: online, then with the mirror gone.

These clients ask ``/api/{type}s/{id}`` for the commit and then request everything by
commit id, so the agent must learn the revision from that answer. Each client runs in a
subprocess of its own (they read HF_ENDPOINT at import time) with a fresh HF_HOME.
Needs the `clients` extra (tests/run.sh installs it).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from agentkit import agent, config, endpoint, write_tree
from huggingface_hub import HfFileSystem
from tokenizers import Tokenizer, models, pre_tokenizers

from peer.mirror_server import MirrorServer, RepoSource

MODEL = "acme/tiny"
PARQUET = "acme/tiny-parquet"
CSV = "acme/tiny-csv"
LFS_SIZE = 3 * 1024 * 1024 + 17  # several Range blocks of HfFileSystem
ROWS = [{"text": f"row {i}", "label": i % 3} for i in range(20)]

LOAD_MODEL = f"""
import json
from transformers import AutoConfig, AutoTokenizer
c = AutoConfig.from_pretrained({MODEL!r})
t = AutoTokenizer.from_pretrained({MODEL!r})
print(json.dumps({{"model_type": c.model_type, "n_embd": c.n_embd,
                  "ids": t("hello world unknown")["input_ids"]}}))
"""

LOAD_DATA = f"""
import json
from datasets import load_dataset
p = load_dataset({PARQUET!r}, split="train")
c = load_dataset({CSV!r}, split="train")
print(json.dumps({{"parquet": p.to_list(), "csv": c.to_list()}}))
"""


def tokenizer_files() -> dict[str, bytes]:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
        ).encode(),
    }


def parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    return buf.getvalue()


def csv_bytes() -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["text", "label"])
    w.writeheader()
    w.writerows(ROWS)
    return buf.getvalue().encode()


async def run_client(script: str, hf_endpoint: str, home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hf_endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_ETAG_TIMEOUT="30",
        HF_HUB_DOWNLOAD_TIMEOUT="30",
        TRANSFORMERS_VERBOSITY="error",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def test_transformers_and_datasets_through_the_agent_then_without_the_mirror(
    tmp_path: Path,
) -> None:
    model_src = write_tree(
        tmp_path / "src/model",
        {
            "config.json": json.dumps(
                {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 3}
            ).encode(),
            **tokenizer_files(),
        },
    )
    parquet_src = write_tree(tmp_path / "src/parquet", {"data/train.parquet": parquet_bytes()})
    csv_src = write_tree(tmp_path / "src/csv", {"data/train.csv": csv_bytes()})
    repos = {("model", MODEL): model_src, ("dataset", PARQUET): parquet_src}
    repos[("dataset", CSV)] = csv_src
    mirror = MirrorServer([RepoSource(t, r, src) for (t, r), src in repos.items()])
    await mirror.start()
    try:
        commits = {key: mirror.commit_of(*key) for key in repos}
        cache = tmp_path / "a/cache"
        async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
            hf = endpoint(a)
            expected_model = {"model_type": "gpt2", "n_embd": 8, "ids": [1, 2, 0]}
            expected_rows = [dict(r) for r in ROWS]
            expected_data = {"parquet": expected_rows, "csv": expected_rows}

            got = await asyncio.gather(
                run_client(LOAD_MODEL, hf, tmp_path / "home-1m"),
                run_client(LOAD_DATA, hf, tmp_path / "home-1d"),
            )
            assert got == [expected_model, expected_data]

            # The agent's cache, as huggingface_hub would have left it: refs/main names
            # the commit (no newline), so no tool takes the snapshot for a detached one.
            for (repo_type, repo_id), commit in commits.items():
                folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
                assert (cache / folder / "refs/main").read_text() == commit
                assert (cache / folder / "snapshots" / commit).is_dir()
                for _ in range(200):  # recorded in the background, for peers and later
                    if a.revisions.book.best(repo_type, repo_id, "main") is not None:
                        break
                    await asyncio.sleep(0.05)
                best = a.revisions.book.best(repo_type, repo_id, "main")
                assert best is not None and best.commit == commit

            await mirror.close()  # from here on, no mirror at all

            got = await asyncio.gather(
                run_client(LOAD_MODEL, hf, tmp_path / "home-2m"),
                run_client(LOAD_DATA, hf, tmp_path / "home-2d"),
            )
            assert got == [expected_model, expected_data]
    finally:
        await mirror.close()


def _fs_walk(hf: str, repo: str) -> dict[str, Any]:
    """What a user of HfFileSystem does: list, glob, and read parts of two files (one
    LFS, read by seeking; one small, read whole)."""
    fs = HfFileSystem(endpoint=hf, token=False, skip_instance_cache=True)
    listed = sorted((e["name"], e["type"], e["size"]) for e in fs.ls(f"{repo}", detail=True))
    globbed = sorted(fs.glob(f"{repo}/**/*.json"))
    with fs.open(f"{repo}/model.safetensors", "rb", block_size=64 * 1024) as f:
        f.seek(LFS_SIZE - 100)
        tail = f.read(100)
        f.seek(1000)
        middle = f.read(5000)
    with fs.open(f"{repo}/sub/config.json", "rb") as f:
        small = f.read()
    return {"ls": listed, "glob": globbed, "tail": tail, "middle": middle, "small": small}


async def test_hf_file_system_through_the_agent_then_without_the_mirror(tmp_path: Path) -> None:
    weights = random.Random(13).randbytes(LFS_SIZE)
    files = {
        "model.safetensors": weights,
        "sub/config.json": b'{"model_type": "gpt2"}',
        "sub/notes.txt": b"notes\n",
    }
    src = write_tree(tmp_path / "src", files)
    async with MirrorServer([RepoSource("model", MODEL, src)]) as mirror:
        async with agent(config(tmp_path / "a", "127.0.0.2", (mirror.url,))) as a:
            expected = {
                "ls": [
                    (f"{MODEL}/model.safetensors", "file", LFS_SIZE),
                    (f"{MODEL}/sub", "directory", 0),
                ],
                "glob": [f"{MODEL}/sub/config.json"],
                "tail": weights[-100:],
                "middle": weights[1000:6000],
                "small": files["sub/config.json"],
            }
            assert await asyncio.to_thread(_fs_walk, endpoint(a), MODEL) == expected
            for _ in range(200):  # recorded in the background
                if a.revisions.book.best("model", MODEL, "main") is not None:
                    break
                await asyncio.sleep(0.05)
            best = a.revisions.book.best("model", MODEL, "main")
            assert best is not None and best.commit == mirror.commit_of("model", MODEL)
            await mirror.close()  # from here on, the agent alone
            assert await asyncio.to_thread(_fs_walk, endpoint(a), MODEL) == expected
