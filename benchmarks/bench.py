"""One benchmark entry. Each subcommand runs the product itself (./run_train.sh, ./run_eval.sh) with a recipe and
flags, reads the figures the product logged (MLflow metrics, metrics.json), runs the original stack as the peer in
the same run where a question has one, writes the raw JSON and prints the benchmarks/RESULTS.md row it measured.

  python3 benchmarks/bench.py train-speed --recipe llama2-7b-chat --shape llama2-7b --steps 30
  python3 benchmarks/bench.py eval-speed --adapter outputs/run/final --batch-sizes auto,64 [--merge]
  python3 benchmarks/bench.py eval-speed --shape llama2-7b --lengths outputs/run/eval/responses.jsonl
  python3 benchmarks/bench.py accuracy --recipe smollm2-135m --seeds 42,43,44
  python3 benchmarks/bench.py scale-out --recipe llama2-7b-chat --shape llama2-7b --gpus 2
  python3 benchmarks/bench.py serve --adapter outputs/run/final --clients 1,16,128

Flags after `--` go to the product unchanged (an ablation is a flag or a recipe key: `-- --no-compile`).
`--shape tiny` runs the same code on a tiny random LLaMA, on a CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("qloraner") is None:
    # Load the package by path rather than putting the project root on sys.path: the root's datasets/ folder would
    # then pass for Hugging Face's `datasets`, which transformers' Trainer (the peer) looks for.
    _spec = importlib.util.spec_from_file_location(
        "qloraner", ROOT / "qloraner" / "__init__.py", submodule_search_locations=[str(ROOT / "qloraner")]
    )
    sys.modules["qloraner"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["qloraner"])
SHAPES = {  # random-weight LLaMA checkpoints with the real LLaMA-2 tokenizer
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "none": None,  # the recipe's own model
}
WARMUP_STEPS = 2  # steps left out of steady-state speed (the first compiles)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def revision() -> str:
    from qloraner.tracking import git_revision

    return git_revision()


def shape_model(shape: str) -> Path | None:
    """A LLaMA checkpoint of `shape` with random bf16 weights, made once under /tmp (None for `none`)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(f"/tmp/qloraner-bench-{shape}")
    if SHAPES[shape] is None:
        return None
    if (path / "config.json").is_file():
        return path
    tokenizer = Path(os.environ.get("LLAMA2_TOKENIZER", ROOT.parent / "shared" / "tokenizers" / "llama-2"))
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, tmp / f)
    os.replace(tmp, path)
    del model
    torch.cuda.empty_cache()  # the peer's peak memory is measured in this process next
    return path


def product(script: str, args: list[str], log: Path, env: dict | None = None) -> float:
    """Run ./run_train.sh or ./run_eval.sh, its output to our stdout and to `log`; its wall seconds. A failure
    stops the benchmark with the script's last lines."""
    command = [str(ROOT / script), *args]
    print(f"bench: {' '.join(shlex.quote(c) for c in command)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
        for line in proc.stdout:
            f.write(line)
            if not line.startswith("\r"):
                print(line, end="", flush=True)
    if proc.wait():
        sys.exit(f"bench: {script} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def training_run(out: Path):
    """The MLflow client of the training run in `out` (its sqlite store) and the run's id (final/'s state)."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / "final" / "trainer_state.json").read_text())["run_id"]
    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), run_id


def training_params(out: Path) -> dict[str, str]:
    """The parameters the training run in `out` logged to its MLflow store (its resolved plan among them)."""
    client, run_id = training_run(out)
    return client.get_run(run_id).data.params


def training_metrics(out: Path) -> dict[str, list[float]]:
    """The per-step metrics the training run in `out` logged to its MLflow store, in step order."""
    client, run_id = training_run(out)
    keys = ("loss", "tokens_per_s", "step_s", "gpu_mem_gib", "compiled_graphs")  # the last with compile only
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def speed(metrics: dict[str, list[float]]) -> dict:
    """Steady-state tokens/s (steps after WARMUP_STEPS, weighted by time), first-step seconds, slow steps (over 3x
    the median), graphs compiled after the first step (with compile) and the peak memory."""
    secs, rates = metrics["step_s"], metrics["tokens_per_s"]
    steady = list(zip(secs, rates))[WARMUP_STEPS:]
    median = statistics.median(s for s, _ in steady)
    calm = [(s, r) for s, r in steady if s <= 3 * median]
    return {
        "tokens_per_s": sum(s * r for s, r in steady) / sum(s for s, _ in steady),
        "tokens_per_s_without_slow_steps": sum(s * r for s, r in calm) / sum(s for s, _ in calm),
        "s_per_step_median": median,
        "first_step_s": secs[0],
        "slow_steps_after_first": sum(s > 3 * median for s in secs[1:]),
        "peak_gib": max(metrics["gpu_mem_gib"], default=0.0),
        "steps": len(secs),
        # graphs compiled after the first step: recompiles (a slow step may also be a checkpoint or a page fault)
        "compiles_after_first": (graphs[-1] - graphs[0]) if (graphs := metrics.get("compiled_graphs")) else None,
    }


def peer_train(model: Path, batch: int, steps: int, lora: dict, lr: float) -> dict:
    """The original stack on the same model and data: HF Trainer + peft, micro-batch 4 with accumulation up to
    `batch`, paged_adamw_32bit, checkpointing, bf16, PyTorch's default attention kernels."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from qloraner.conll import resolve_data_dir
    from qloraner.data import encode, instruction_data
    from qloraner.model import load_base, load_tokenizer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tok = load_tokenizer(model)
    records, _ = instruction_data(
        resolve_data_dir(None, ROOT), "simple", Path("/tmp/bench-instruct.json"), steps * batch
    )
    examples = encode(tok, [r["prompt"] for r in records], [r["response"] for r in records])
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    base = load_base(model, torch.device("cuda" if cuda else "cpu"))
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(True)  # load_base turns it off; the original stack has the default
    peft_model = get_peft_model(prepare_model_for_kbit_training(base), LoraConfig(task_type="CAUSAL_LM", **lora))
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    micro = min(4, batch)
    args = TrainingArguments(
        output_dir="/tmp/bench-peer",
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        optim="paged_adamw_32bit",
        gradient_checkpointing=True,
        bf16=cuda,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=not cuda,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    start = time.perf_counter()
    Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Clock()]).train()
    secs = [b - a for a, b in zip([start, *marks], marks)]
    tokens = [sum(len(r["input_ids"]) for r in rows[i * batch : (i + 1) * batch]) for i in range(len(secs))]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return speed({"step_s": secs, "tokens_per_s": [t / s for t, s in zip(tokens, secs)], "gpu_mem_gib": [peak]})


def _recipe(name: str) -> dict:
    from qloraner.config import TrainConfig, load_recipe

    return load_recipe(TrainConfig, name)[1]


def train_speed(a: argparse.Namespace, work: Path) -> dict:
    """Our loop through ./run_train.sh with the recipe against the original stack, same model, batch and LoRA."""
    from qloraner.config import TrainConfig
    from qloraner.sources import resolve_model

    model = shape_model(a.shape)
    recipe = _recipe(a.recipe)
    batch = recipe.get("batch_size", 16)
    peer = None
    if a.peer:
        lora = dict(
            r=recipe.get("lora_r", 64),
            lora_alpha=recipe.get("lora_alpha", 16),
            lora_dropout=recipe.get("lora_dropout", 0.1),
            target_modules=TrainConfig(**recipe).target_module_list,
        )
        peer = peer_train(
            model or resolve_model(recipe.get("model")), batch, a.peer_steps, lora, recipe.get("lr", 2e-4)
        )
    out = work / "ours"
    args = ["--recipe", a.recipe, "--max-steps", str(a.steps), "--limit", str(a.steps * batch), "--save-every", "0"]
    args += [
        "--no-eval",
        "--no-resume",
        "--output-dir",
        str(out),
        *(["--model", str(model)] if model else []),
        *a.flags,
    ]
    wall = product("run_train.sh", args, work / "ours.log", card_budget(a.card_gib, work))
    ours = {**speed(training_metrics(out)), "wall_s": wall, "card_gib": a.card_gib or None}
    params = training_params(out)
    ours["checkpointing"] = f"{params['gradient_checkpointing_used']} ({params['gradient_checkpointing_source']})"
    result = {"ours": ours, "peer": peer}
    if peer:
        result["speedup"] = ours["tokens_per_s"] / peer["tokens_per_s"]
    cells = f"{ours['tokens_per_s']:,.0f} tokens/s, peak {ours['peak_gib']:.2f} GiB"
    cells += f", checkpointing {ours['checkpointing']}"
    cells += f", first step {ours['first_step_s']:.0f} s, {ours['slow_steps_after_first']} slow steps after it"
    if ours["compiles_after_first"] is not None:
        cells += f" ({ours['compiles_after_first']:.0f} compiles after it)"
    if peer:
        cells = (
            f"peer {peer['tokens_per_s']:,.0f} tokens/s at {peer['peak_gib']:.2f} GiB → ours {cells} "
            f"(**{result['speedup']:.2f}×**)"
        )
    budget = f", the card cut to {a.card_gib:g} GiB" if a.card_gib else ""
    result["row"] = [f"{a.shape} shape, recipe {a.recipe}, {a.steps} steps{budget}", cells]
    return result


CARD_BUDGET = """
import torch
if torch.cuda.is_available():  # the caching allocator refuses more than this share, as a smaller card would
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, {gib} * 2**30 / total))
"""


def card_budget(gib: float, work: Path) -> dict | None:
    """The environment that makes our training see a card of `gib` GiB (0: the whole card): a sitecustomize.py on
    PYTHONPATH sets torch's per-process memory fraction before the product starts, so the product's own memory rule
    reads the smaller card; the peer runs on the whole card."""
    if not gib:
        return None
    folder = work / "card-budget"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(CARD_BUDGET.format(gib=gib))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def eval_speed(a: argparse.Namespace, work: Path) -> dict:
    """./run_eval.sh on the adapter at each batch size (and merged, with --merge), against the original's `pipeline`
    (batch 8, 150 new tokens) and transformers' `generate` with its static cache and torch.compile, both on the
    first --peer-sentences sentences, all scored by our parser. With --shape: see decode_shape."""
    if a.shape != "none":
        return decode_shape(a, work)
    result: dict = {"ours": {}}
    first, *others = a.batch_sizes.split(",")
    variants = [(first, False, False)] + [(first, True, False)] * a.merge + [(first, False, True)] * a.also_eager
    variants += [(b, False, False) for b in others]
    for batch, merge, eager in variants:
        name = f"b{batch}{'-merged' if merge else ''}{'-eager' if eager else ''}"
        extra = (["--merge"] if merge else []) + (["--no-cuda-graphs"] if eager else [])
        args = ["--adapter", a.adapter, "--batch-size", batch, "--output-dir", str(work / name), *a.flags]
        product("run_eval.sh", args + extra, work / f"{name}.log")
        m = json.loads((work / name / "metrics.json").read_text())
        keep = ("f1", "precision", "recall", "seconds", "sentences_per_s", "sentences", "batch_size", "engine")
        result["ours"][name] = {k: m.get(k) for k in keep}
    if a.peer_sentences:
        from qloraner.config import EvalConfig
        from qloraner.evaluate import load_for_eval

        model, tok, prompting, _ = load_for_eval(EvalConfig(adapter=a.adapter), _device())
        sentences = _test_sentences()[: a.peer_sentences]
        result["peer"] = peer_pipeline(model, tok, sentences, prompting)
        result["peer_static"] = peer_generate(model, tok, sentences, prompting, None)
        for name in result["ours"]:  # ours on the peers' sentences, from its responses
            rows = [json.loads(x) for x in (work / name / "responses.jsonl").read_text().splitlines()]
            raw = [r["raw_response"] for r in rows[: len(sentences)]]
            result["ours"][name]["f1_on_peer_sentences"] = _score(sentences, raw)
    best = max(result["ours"].items(), key=lambda kv: kv[1]["sentences_per_s"])
    cells = ", ".join(
        f"{k}: {v['seconds']:.1f} s, {v['sentences_per_s']:.1f} sentences/s, F1 {100 * v['f1']:.2f}"
        for k, v in result["ours"].items()
    )
    for key, what in (("peer", "pipeline"), ("peer_static", "generate static+compile")):
        if result.get(key):
            peer = result[key]
            result[f"speedup_{key}"] = best[1]["sentences_per_s"] / peer["sentences_per_s"]
            cells += (
                f"; {what} {peer['sentences_per_s']:.2f} sentences/s on {peer['sentences']} "
                f"(F1 {100 * peer['f1']:.2f} on those): best **{result[f'speedup_{key}']:.1f}×**"
            )
    result["row"] = [f"decode the test split, adapter {a.adapter}", cells]
    return result


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _test_sentences():
    from qloraner.conll import read_split, resolve_data_dir

    return read_split(resolve_data_dir(None, ROOT), "test")


def _lengths(path: str) -> list[int]:
    """Tokens each response of a responses.jsonl(.gz) took, its stopping EOS included."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line)["generated_tokens"] + 1 for line in f]


def decode_shape(a: argparse.Namespace, work: Path) -> dict:
    """Our engine on a random-weight model of --shape over the whole test split, each row decoding exactly the
    length a real fine-tuned run's response took (--lengths; random weights never stop by themselves): NF4 with
    an unmerged random LoRA on q/v (r=64), also with bitsandbytes' 4-bit kernels at every step, then bf16 (what a
    merged adapter decodes with). Peers on the first --peer-sentences sentences of the NF4 model: generate with a
    static cache and torch.compile, each batch run to its longest length, and `pipeline` (batch 8, 150 new tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qloraner.decode import auto_batch_size, generate_greedy
    from qloraner.model import load_base, load_tokenizer
    from qloraner.prompts import Prompting

    path, device = shape_model(a.shape), _device()
    sentences = _test_sentences()
    lengths = _lengths(a.lengths)[: len(sentences)]
    sentences = sentences[: len(lengths)]
    tok = load_tokenizer(path, padding_side="left")
    prompts = [tok(t)["input_ids"] for t in _prompt_texts(sentences, Prompting())]
    result: dict = {"ours": {}, "sentences": len(prompts), "generated_tokens": sum(lengths)}
    loaders = {
        "nf4-lora": lambda: get_peft_model(
            load_base(path, device), LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        ),
        "bf16": lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device),
    }
    for name, load in loaders.items():
        model = load().eval()
        batch = auto_batch_size(model, max(len(p) + n for p, n in zip(prompts, lengths)))
        # (graphs, dequantize, fused): the default; without CUDA graphs; with PyTorch's attention instead of the
        # Triton kernel; and (NF4) with bitsandbytes' 4-bit kernels at every step instead of weights dequantized once
        variants = {"": (True, None, None)} | ({"-eager": (False, None, None)} if a.also_eager else {})
        variants |= {"-pytorch-attention": (True, None, False)} if a.also_pytorch_attention else {}
        variants |= {"-4bit-each-step": (True, False, None)} if name == "nf4-lora" else {}
        for suffix, (graphs, dequantize, fused) in variants.items():
            _sync()
            start = time.perf_counter()
            gen = generate_greedy(
                model, tok, prompts, lengths, batch, graphs=graphs, stop=False, dequantize=dequantize, fused=fused
            )
            _sync()
            seconds = time.perf_counter() - start
            assert [len(t) for t in gen.tokens] == lengths
            result["ours"][name + suffix] = {
                "seconds": seconds,
                "sentences_per_s": len(prompts) / seconds,
                "tokens_per_s": sum(lengths) / seconds,
                "batch_size": batch,
                "engine": gen.stats,
            }
            print(f"bench: {name}{suffix}: {seconds:.1f} s at batch {batch}", flush=True)
        if name == "nf4-lora" and a.peer_sentences:
            few = sentences[: a.peer_sentences]
            result["peer_static"] = peer_generate(model, tok, few, Prompting(), lengths[: len(few)])
            result["peer"] = peer_pipeline(model, tok, few[: max(8, len(few) // 8)], Prompting())
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cells = ", ".join(f"{k}: **{v['seconds']:.1f} s** (batch {v['batch_size']})" for k, v in result["ours"].items())
    for key, what in (("peer_static", "generate static+compile"), ("peer", "pipeline")):
        if result.get(key):
            peer = result[key]
            ratio = result["ours"]["nf4-lora"]["sentences_per_s"] / peer["sentences_per_s"]
            result[f"speedup_{key}"] = ratio
            cells += (
                f"; {what} {peer['sentences_per_s']:.2f} sentences/s on {peer['sentences']} (NF4 ours {ratio:.1f}×)"
            )
    result["row"] = [f"{a.shape} shape, {len(prompts)} test prompts, response lengths of {Path(a.lengths).name}", cells]
    return result


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _score(sentences, texts: list[str]) -> float:
    from qloraner.bio import entities_to_bio
    from qloraner.metrics import score
    from qloraner.parse import parse_response

    pred = [entities_to_bio(s.tokens, parse_response(t)) for s, t in zip(sentences, texts)]
    return score([list(s.tags) for s in sentences], pred)["f1"]


def _prompt_texts(sentences, prompting) -> list[str]:
    """The prompts the peers are given: the adapter's (a prompts.Prompting), as ours decodes them."""
    return [prompting.text(s.tokens, s.context) for s in sentences]


def peer_generate(model, tok, sentences, prompting, lengths: list[int] | None, batch: int = 64) -> dict:
    """transformers' generate as its docs recommend for speed: a static cache, the forward compiled by generate
    itself, prompts padded to one length (one compiled shape). A batch ends when every row wrote EOS or after
    its longest budget (`lengths`, rows of a random model never stop; else 256 tokens)."""
    texts = _prompt_texts(sentences, prompting)
    width = max(len(tok(t)["input_ids"]) for t in texts)
    out, start = [], time.perf_counter()
    for b in range(0, len(texts), batch):
        enc = tok(texts[b : b + batch], return_tensors="pt", padding="max_length", max_length=width).to(model.device)
        new = max(lengths[b : b + batch]) if lengths else 256
        ids = model.generate(
            **enc,
            max_new_tokens=new,
            min_new_tokens=new if lengths else 0,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=tok.eos_token_id,
        )
        out += tok.batch_decode(ids[:, width:], skip_special_tokens=True)
        if b == 0:
            first = time.perf_counter() - start
    _sync()
    seconds = time.perf_counter() - start
    n = len(sentences)
    return {
        "sentences": n,
        "seconds": seconds,
        "first_batch_s": first,
        "sentences_per_s": n / seconds,
        "f1": _score(sentences, out),
        "batch_size": batch,
    }


def peer_pipeline(model, tok, sentences, prompting) -> dict:
    """The original's evaluator: transformers' text-generation pipeline, batch 8, 150 new tokens, no stop rule."""
    import torch
    from transformers import pipeline

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(True)  # the original ran with PyTorch's default kernels
    pipe = pipeline(
        "text-generation",
        model=model,
        tokenizer=tok,
        batch_size=8,
        max_new_tokens=150,
        do_sample=False,
        return_full_text=False,
    )
    start = time.perf_counter()
    out = pipe(_prompt_texts(sentences, prompting))
    seconds = time.perf_counter() - start
    n = len(sentences)
    return {
        "sentences": n,
        "seconds": seconds,
        "sentences_per_s": n / seconds,
        "f1": _score(sentences, [o[0]["generated_text"] for o in out]),
    }


def accuracy(a: argparse.Namespace, work: Path) -> dict:
    """./run_train.sh with the recipe, once per seed (train, then the full test split); F1 mean and spread."""
    runs = {}
    for seed in a.seeds.split(","):
        out = work / f"seed-{seed}"
        wall = product(
            "run_train.sh",
            ["--recipe", a.recipe, "--seed", seed, "--output-dir", str(out), *a.flags],
            work / f"seed-{seed}.log",
        )
        m = json.loads((out / "eval" / "metrics.json").read_text())
        runs[seed] = {
            "f1": m["f1"],
            "precision": m["precision"],
            "recall": m["recall"],
            "sentences": m["sentences"],
            "per_type_f1": {t: v["f1-score"] for t, v in m["per_type"].items()},
            "wall_s": wall,
            "eval_seconds": m["seconds"],
            "parse_failures": m["parse_failures"],
        }
    f1s = [100 * r["f1"] for r in runs.values()]
    spread = f" ± {statistics.stdev(f1s):.2f} (sd, {len(f1s)} seeds)" if len(f1s) > 1 else f" (seed {a.seeds})"
    result = {"runs": runs, "f1_mean": statistics.mean(f1s)}
    sentences = next(iter(runs.values()))["sentences"]
    result["row"] = [f"recipe {a.recipe}, {sentences} test sentences", f"F1 **{result['f1_mean']:.2f}**{spread}"]
    return result


def scale_out(a: argparse.Namespace, work: Path) -> dict:
    """./run_train.sh on 1 GPU, then on --gpus GPUs (torchrun), the same recipe and global batch."""
    model = shape_model(a.shape)
    result = {}
    for n in (1, a.gpus):
        out = work / f"gpus-{n}"
        args = ["--recipe", a.recipe, "--max-steps", str(a.steps), "--save-every", "0", "--no-eval", "--no-resume"]
        args += ["--output-dir", str(out), *(["--model", str(model)] if model else []), *a.flags]
        product("run_train.sh", args, work / f"gpus-{n}.log", env={"QLORANER_NPROC": str(n)})
        result[f"{n}"] = speed(training_metrics(out))
    result["scaling"] = result[f"{a.gpus}"]["tokens_per_s"] / result["1"]["tokens_per_s"]
    one, many = result["1"]["tokens_per_s"], result[f"{a.gpus}"]["tokens_per_s"]
    result["row"] = [
        f"{a.shape} shape, recipe {a.recipe}, 1 → {a.gpus} GPUs",
        f"{one:,.0f} → {many:,.0f} tokens/s (**{result['scaling']:.2f}×**)",
    ]
    return result


def _start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """./run_serve.sh on a free port of 127.0.0.1, its stderr to `log`; the process and its URL once it listens."""
    import re

    command = [str(ROOT / "run_serve.sh"), "--port", "0", *args]
    print(f"bench: {' '.join(shlex.quote(c) for c in command)}", flush=True)
    f = open(log, "w")  # noqa: SIM115 -- the server writes to it until _stop_server
    proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1800  # a 7B base loads and captures its CUDA graphs first
    while time.monotonic() < deadline and proc.poll() is None:
        if m := re.search(r"qloraner serve: listening on (http://\S+)", log.read_text()):
            return proc, m[1]
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"bench: ./run_serve.sh did not start; see {log}")


def _stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, as a deployment stops it; its exit code must be 0."""
    proc.terminate()
    if proc.wait(timeout=600):
        sys.exit(f"bench: ./run_serve.sh exited {proc.returncode} on SIGTERM")


def _clients(url: str, texts: list[str], n: int) -> dict:
    """`n` clients on keep-alive connections, each posting the next text as {"text": ...} until none is left;
    sentences/s over the whole run and each request's latency percentiles."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    where = urlsplit(url)
    todo, latencies, failures, lock = iter(texts), [], [], threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
        while True:
            with lock:
                text = next(todo, None)
            if text is None:
                return
            start = time.perf_counter()
            conn.request("POST", "/tag", json.dumps({"text": text}), {"Content-Type": "application/json"})
            answer = conn.getresponse()
            body = answer.read()
            with lock:
                latencies.append(time.perf_counter() - start)
                if answer.status != 200:
                    failures.append(f"{answer.status} {body[:200]!r}")

    threads = [threading.Thread(target=client) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        sys.exit(f"bench: {len(failures)} requests failed at {n} clients, e.g. {failures[0]}")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "clients": n,
        "sentences": len(texts),
        "seconds": seconds,
        "sentences_per_s": len(texts) / seconds,
        "p50_ms": 1000 * q[49],
        "p99_ms": 1000 * q[98],
    }


def serve_speed(a: argparse.Namespace, work: Path) -> dict:
    """./run_serve.sh on the adapter: --sentences test sentences (one per request) at each client count, then the
    offline Tagger on the same sentences in one call, in this process once the server is gone (one model on the
    GPU at a time)."""
    texts = [" ".join(s.tokens) for s in _test_sentences()[: a.sentences]]
    began = time.perf_counter()
    proc, url = _start_server(["--adapter", a.adapter, *a.flags], work / "serve.log")
    print(f"bench: the server listens after {time.perf_counter() - began:.1f} s", flush=True)
    try:
        warm = _clients(url, texts[:32], 4)  # warm-up: the first shapes of the engine's batches
        print(f"bench: warm-up, {warm['sentences']} requests at 4 clients: {warm['seconds']:.1f} s", flush=True)
        result: dict = {"clients": []}
        for n in a.clients.split(","):  # each line as it ends: a run cut by a time limit still shows how far it got
            result["clients"].append(_clients(url, texts, int(n)))
            print(f"bench: {json.dumps(result['clients'][-1])}", flush=True)
    finally:
        _stop_server(proc)
    began = time.perf_counter()
    from qloraner.serve import load_tagger, settings

    tagger = load_tagger(settings(["--adapter", a.adapter, *a.flags]))  # the server's settings, flags included
    tagger.tag(texts[:32])  # the same warm-up
    _sync()
    print(f"bench: the offline Tagger loaded and warmed up in {time.perf_counter() - began:.1f} s", flush=True)
    start = time.perf_counter()
    tagger.tag(texts)
    _sync()
    seconds = time.perf_counter() - start
    result["offline"] = {"sentences": len(texts), "seconds": seconds, "sentences_per_s": len(texts) / seconds}
    offline = result["offline"]["sentences_per_s"]
    cells = [f"offline Tagger {offline:.1f} sentences/s"] + [
        f"{c['clients']} clients {c['sentences_per_s']:.1f} sentences/s (**{100 * c['sentences_per_s'] / offline:.0f}"
        f" %** of offline), p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms"
        for c in result["clients"]
    ]
    result["row"] = [f"serve {len(texts)} test sentences over HTTP, adapter {a.adapter}", "; ".join(cells)]
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"), help="where raw JSON and logs go")
    sub = parser.add_subparsers(dest="question", required=True)
    p = sub.add_parser("train-speed")
    p.set_defaults(measure=train_speed)
    p.add_argument("--recipe", default="llama2-7b-chat")
    p.add_argument("--shape", default="llama2-7b", choices=SHAPES)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peer-steps", type=int, default=8)
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--card-gib", type=float, default=0.0, help="our training sees a card of this size (0: the whole)")
    p = sub.add_parser("eval-speed")
    p.set_defaults(measure=eval_speed)
    p.add_argument("--adapter", help="the fine-tuned adapter (without --shape)")
    p.add_argument("--batch-sizes", default="auto")
    p.add_argument("--merge", action="store_true", help="also the first batch size with --merge")
    p.add_argument("--peer-sentences", type=int, default=200)
    p.add_argument("--shape", default="none", choices=SHAPES, help="a random-weight model of this shape instead")
    p.add_argument("--lengths", help="with --shape: the responses.jsonl(.gz) whose response lengths each row decodes")
    p.add_argument("--also-eager", action="store_true", help="also without CUDA graphs (the first batch size)")
    p.add_argument(
        "--also-pytorch-attention",
        action="store_true",
        help="with --shape: also with the decode step's attention in PyTorch instead of the Triton kernel",
    )
    p = sub.add_parser("accuracy")
    p.set_defaults(measure=accuracy)
    p.add_argument("--recipe", default="smollm2-135m")
    p.add_argument("--seeds", default="42")
    p = sub.add_parser("scale-out")
    p.set_defaults(measure=scale_out)
    p.add_argument("--recipe", default="llama2-7b-chat")
    p.add_argument("--shape", default="llama2-7b", choices=SHAPES)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p = sub.add_parser("serve")
    p.set_defaults(measure=serve_speed)
    p.add_argument("--adapter", required=True, help="the fine-tuned adapter")
    p.add_argument("--clients", default="1,16,128", help="concurrent clients, one run each")
    p.add_argument("--sentences", type=int, default=2000, help="the first N test sentences, each one request")
    a = parser.parse_args(argv)
    a.flags = flags
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    what = f"-{a.shape}" if getattr(a, "shape", "none") != "none" else ""
    work = Path(a.out) / f"{a.question}{what}-{stamp}-{revision()}"
    work.mkdir(parents=True, exist_ok=True)
    command = "python3 benchmarks/bench.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    result = a.measure(a, work)
    card, rev = device_name(), revision()
    report = {"question": a.question, "card": card, "date": stamp, "revision": rev, "command": command, **result}
    raw = work / "result.json"
    raw.write_text(json.dumps(report, indent=2))
    what, figure = result["row"]
    print(f"| {what} | {card} | {stamp} | `{rev}` | `{command}` | {figure} | `{raw}` |", flush=True)


if __name__ == "__main__":
    main()
